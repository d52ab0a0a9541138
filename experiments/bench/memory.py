"""Product-key memory read, forward + backward: time per token grows ~ sqrt(N), not N.

`python -m experiments.bench memory [--json FILE] [--quick]`

What is measured, per memory size N = P^2 (k = 32 slots per token, one head, query dim Q = 128,
value dim D = 128, B = 256 tokens; `--quick`: N = 16^2..128^2, k = 8, B = 32): one jitted call
that reads the memory and back-propagates a fixed output cotangent to the query, the sub-keys
and the gathered value rows, returning (out, d query, d sub-keys, idx, d rows): the sparse
value gradient that a row-sparse optimizer consumes. The read cases below, at every N, are timed
interleaved (`timing.interleaved_cases`: a warm-up round, then `--repeats` rounds of every case
in turn; median_s, min_s, max_s).

* `pkm_N{N}`: `sparsejax.memory.pkm_lookup` (top-k of each half, top-k of ~k ln k candidate
  sums) then the embedding-bag read. Cost O(P Q + k D) per token.
* `naive_N{N}`: the baseline — the same product keys, but every one of the N scores
  s1_i + s2_j is formed (s1, s2 from `pkm.half_scores`, so Q-dim dot products are still
  only 2P per token) and `lax.top_k` runs over all N; same read. O(N) per token. Skipped when
  its N-wide score, cotangent and top-k buffers (~3 B N 4 bytes) exceed 4 GiB.
* `pkm_densegrad_N{N}`: `jax.grad` of `pkm_read` w.r.t. query, sub-keys and the whole value
  table, as a training step with a dense optimizer computes it: the N x D value gradient is
  materialised, so this grows with N through that one zero-filled buffer.

* `pkm_train_step_N{N}` (N = 128^2 and 1024^2; `--quick`: 16^2 and 32^2): one training step
  of a one-layer model y = x + m(x W_q), loss mean (y - target)^2: forward, backward to W_q,
  the sub-keys and the gathered value rows, AdamW on W_q and the sub-keys, and the lazy
  row-wise AdamW of `sparsejax.memory.sparse_optim` on the <= B k distinct rows read (repeats
  merged), with params and optimizer state donated so the value table and its moments are
  updated in place. Timed interleaved with each other (`timing.interleaved_calls`, each call
  runs on the previous call's state); `vs_smallest_N` is the 1024^2 / 128^2 ratio (target
  <= 2). `python -m experiments.bench memory_train` runs only these two cases.

Extra columns: `us_per_token`, `vs_smallest_N` (this method's time / its time at the smallest
N, both from this run), `naive_over_pkm` (naive time / pkm time at the same N) and
`temp_bytes` (XLA's temporaries, excluding the arguments, of which the N x D table is one).
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

import optax

from experiments.bench import timing
from sparsejax.memory import pkm
from sparsejax.memory import sparse_optim

DESCRIPTION = "product-key memory fwd+bwd per token vs memory size N, against full N scoring"
BASELINE = "pkm_N16384"

TOP_K = 32
QUERY_DIM = 128
VALUE_DIM = 128
NUM_KEYS = (128, 256, 512, 1024)
TOKENS = 256
QUICK_NUM_KEYS = (16, 32, 64, 128)
QUICK_TOKENS = 32
QUICK_TOP_K = 8
NAIVE_BUDGET_BYTES = 4 * 2**30
TRAIN_NUM_KEYS = (128, 1024)
QUICK_TRAIN_NUM_KEYS = (16, 32)
TRAIN_LEARNING_RATE = 1e-3
TRAIN_WEIGHT_DECAY = 0.1


def _weighted_rows(scores_BHK: jax.Array, rows_BHKD: jax.Array) -> jax.Array:
  """sum_h sum_k softmax(scores_h)_k rows_hk: the read given the gathered rows."""
  return jnp.einsum("bhk,bhkd->bd", jax.nn.softmax(scores_BHK, axis=-1), rows_BHKD)


def naive_lookup(query_BHQ: jax.Array, keys_H2PA: jax.Array, k: int):
  """(scores_BHK, idx_BHK) by forming all N = P^2 scores s1_i + s2_j and a top-k over N."""
  s1_BHP, s2_BHP = pkm.half_scores(query_BHQ, keys_H2PA)
  scores_BHN = (s1_BHP[..., :, None] + s2_BHP[..., None, :]).reshape(*s1_BHP.shape[:-1], -1)
  scores_BHK, idx_BHK = jax.lax.top_k(scores_BHN, k)
  return scores_BHK, idx_BHK.astype(jnp.int32)


def sparse_read_fwd_bwd(lookup: Callable, k: int, query_BHQ, keys_H2PA, values_ND, dout_BD):
  """Read, then back-propagate `dout` to query, sub-keys and the gathered value rows."""
  scores_BHK, lookup_vjp, idx_BHK = jax.vjp(
      lambda q, c: lookup(q, c, k), query_BHQ, keys_H2PA, has_aux=True
  )
  rows_BHKD = jnp.take(values_ND, idx_BHK, axis=0, mode="clip")
  out_BD, read_vjp = jax.vjp(_weighted_rows, scores_BHK, rows_BHKD)
  dscores_BHK, drows_BHKD = read_vjp(dout_BD)
  dquery_BHQ, dkeys_H2PA = lookup_vjp(dscores_BHK)
  return out_BD, dquery_BHQ, dkeys_H2PA, idx_BHK, drows_BHKD


def dense_grad_fwd_bwd(k: int, query_BHQ, keys_H2PA, values_ND, dout_BD):
  """jax.grad of <pkm_read(...), dout> w.r.t. query, sub-keys and the full value table."""
  return jax.grad(
      lambda q, c, v: jnp.vdot(pkm.pkm_read(q, c, v, k)[0], dout_BD), argnums=(0, 1, 2)
  )(query_BHQ, keys_H2PA, values_ND)


def _inputs(num_keys: int, tokens: int) -> tuple[jax.Array, ...]:
  """Random query, sub-keys, N x D values and output cotangent for one memory size."""
  rngs = jax.random.split(jax.random.key(num_keys), 4)
  return (
      jax.random.normal(rngs[0], (tokens, 1, QUERY_DIM)),
      jax.random.normal(rngs[1], (1, 2, num_keys, QUERY_DIM // 2)) * (QUERY_DIM // 2) ** -0.5,
      jax.random.normal(rngs[2], (num_keys**2, VALUE_DIM)) * VALUE_DIM**-0.5,
      jax.random.normal(rngs[3], (tokens, VALUE_DIM)),
  )


def _temp_bytes(fn: Callable, args: tuple) -> int | None:
  """XLA's temporary bytes for the compiled `fn(*args)`, excluding arguments and outputs."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return None if stats is None else int(stats.temp_size_in_bytes)


def train_step(k: int, dense_tx: optax.GradientTransformation, params: dict, opt_state: tuple,
               x_BD: jax.Array, target_BD: jax.Array) -> tuple[dict, tuple, jax.Array]:
  """One step of y = x + m(x W_q) on mean (y - target)^2: (params, opt state, loss).

  The value table gets gradient only on the gathered rows (never an N x D buffer); repeated
  reads are merged (`sparse_optim.merge_rows`) and `sparse_optim.row_adam_step` updates those
  rows; W_q and the sub-keys get `dense_tx`.
  """
  dense_state, value_state = opt_state
  values_ND = params["values"]
  dense = {"w_q": params["w_q"], "subkeys": params["subkeys"]}

  def lookup(dense):
    query_B1Q = (x_BD @ dense["w_q"])[:, None, :]
    return pkm.pkm_lookup(query_B1Q, dense["subkeys"], k)

  scores_B1K, lookup_vjp, idx_B1K = jax.vjp(lookup, dense, has_aux=True)
  rows_B1KD = jnp.take(values_ND, idx_B1K, axis=0, mode="clip")
  loss, head_vjp = jax.vjp(
      lambda s, r: jnp.mean((x_BD + _weighted_rows(s, r) - target_BD) ** 2), scores_B1K,
      rows_B1KD)
  dscores_B1K, drows_B1KD = head_vjp(jnp.ones_like(loss))
  (ddense,) = lookup_vjp(dscores_B1K)
  updates, dense_state = dense_tx.update(ddense, dense_state, dense)
  dense = optax.apply_updates(dense, updates)
  idx_R, grad_RD = sparse_optim.merge_rows(idx_B1K.reshape(-1),
                                           drows_B1KD.reshape(-1, values_ND.shape[1]),
                                           values_ND.shape[0])
  values_ND, value_state = sparse_optim.row_adam_step(
      values_ND, value_state, idx_R, grad_RD, TRAIN_LEARNING_RATE,
      weight_decay=TRAIN_WEIGHT_DECAY)
  return {**dense, "values": values_ND}, (dense_state, value_state), loss


def _train_call(num_keys: int, tokens: int, k: int) -> tuple[Callable[[], Any], int | None]:
  """(a call running one donated train step on the state the previous call left, peak bytes)."""
  dense_tx = optax.adamw(TRAIN_LEARNING_RATE, weight_decay=TRAIN_WEIGHT_DECAY)
  x_BD, keys_12PA, values_ND, target_BD = _inputs(num_keys, tokens)
  w_q = jax.random.normal(jax.random.key(1), (VALUE_DIM, QUERY_DIM)) * VALUE_DIM**-0.5
  params = {"w_q": w_q, "subkeys": keys_12PA, "values": values_ND}
  opt_state = (dense_tx.init({"w_q": w_q, "subkeys": keys_12PA}),
               sparse_optim.init_row_adam(values_ND))
  x_BD = x_BD[:, 0, :VALUE_DIM]
  step = jax.jit(functools.partial(train_step, k, dense_tx), donate_argnums=(0, 1))
  compiled = step.lower(params, opt_state, x_BD, target_BD).compile()
  state = {"params": params, "opt_state": opt_state}

  def call():
    state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"],
                                                        x_BD, target_BD)
    jax.block_until_ready(loss)

  return call, timing.compiled_peak_bytes(compiled)


def run_train(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """Rows for `pkm_train_step_N{N}`, timed interleaved, with `vs_smallest_N` and us_per_token."""
  num_keys_list, tokens, k = ((QUICK_TRAIN_NUM_KEYS, QUICK_TOKENS, QUICK_TOP_K) if quick
                              else (TRAIN_NUM_KEYS, TOKENS, TOP_K))
  calls, peaks = {}, {}
  for num_keys in num_keys_list:
    name = f"pkm_train_step_N{num_keys**2}"
    calls[name], peaks[name] = _train_call(num_keys, tokens, k)
  rows = timing.interleaved_calls(calls, repeats=repeats, warmup=2)
  for row in rows:
    row["peak_bytes"] = peaks[row["case"]]
    row["us_per_token"] = row["median_s"] / tokens * 1e6
    row["vs_smallest_N"] = row["median_s"] / rows[0]["median_s"]
  return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
  """Adds `vs_smallest_N` and `naive_over_pkm`, both ratios of times from this run."""
  by_case = {row["case"]: row for row in rows}
  smallest = {}
  for row in rows:
    method, size = row["case"].rsplit("_N", 1)
    first = smallest.setdefault(method, row["median_s"])
    row["vs_smallest_N"] = row["median_s"] / first
    naive = by_case.get(f"naive_N{size}")
    if method == "pkm" and naive is not None:
      row["naive_over_pkm"] = naive["median_s"] / row["median_s"]


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """Rows for pkm, naive (where it fits the budget) and dense-gradient pkm at each N."""
  num_keys_list, tokens, k = (
      (QUICK_NUM_KEYS, QUICK_TOKENS, QUICK_TOP_K) if quick else (NUM_KEYS, TOKENS, TOP_K)
  )
  cases = {}
  for num_keys in num_keys_list:
    size = num_keys**2
    args = _inputs(num_keys, tokens)
    cases[f"pkm_N{size}"] = (functools.partial(sparse_read_fwd_bwd, pkm.pkm_lookup, k), args)
    if 3 * tokens * size * 4 <= NAIVE_BUDGET_BYTES:
      cases[f"naive_N{size}"] = (functools.partial(sparse_read_fwd_bwd, naive_lookup, k), args)
    cases[f"pkm_densegrad_N{size}"] = (functools.partial(dense_grad_fwd_bwd, k), args)
  rows = timing.interleaved_cases(cases, repeats=repeats)
  for row in rows:
    row.update(temp_bytes=_temp_bytes(*cases[row["case"]]),
               us_per_token=row["median_s"] / tokens * 1e6)
  _add_ratios(rows)
  return rows + run_train(repeats, quick)
