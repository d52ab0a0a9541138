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

* `pkm_train_step_N{N}` (N = 128^2 and 1024^2; `--quick`: 16^2 and 32^2): one step of the
  trainer (`experiments.trainer.make_train_step`, jitted with the state donated as the Trainer
  does) on a one-layer model y = x + m(x) (`MemoryRegressor`: a `ProductKeyMemory`, one head),
  loss mean (y - target)^2, with the run optimizer of `experiments.optim.make_optimizer` at
  `memory_values="sparse"`: forward, backward with the value table's gradient as
  (rows read, their gradient) (`sparsejax.memory.row_grad`), global-norm clipping, AdamW on the
  query projection, norm and sub-keys, and the lazy row-wise AdamW on the <= B k distinct rows
  read, applied in place. Timed interleaved with each other (`timing.interleaved_calls`, each
  call runs on the previous call's state); `vs_smallest_N` is the 1024^2 / 128^2 ratio (target
  <= 2). `python -m experiments.bench memory_train` runs only the train-step cases.
* `pkm_train_step_dense_N{N}`: the baseline, the same trainer step at `memory_values="dense"`
  (N x D value gradient, AdamW over the whole table and both its moments), timed interleaved
  with each other after the sparse group (so its O(N D) passes do not evict the sparse cases'
  state from the caches); `dense_over_sparse` on the sparse rows is its time over theirs.

Extra columns: `us_per_token`, `vs_smallest_N` (this method's time / its time at the smallest
N, both from this run), `naive_over_pkm` (naive time / pkm time at the same N) and
`temp_bytes` (XLA's temporaries, excluding the arguments, of which the N x D table is one).
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from experiments import optim
from experiments import trainer
from experiments.bench import timing
from sparsejax.memory import layers
from sparsejax.memory import pkm

DESCRIPTION = "product-key memory fwd+bwd per token vs memory size N, against full N scoring"
BASELINE = "pkm_N16384"
# Columns of the README table (experiments/claims/readme.py): {row key: header}.
README_COLUMNS = {"us_per_token": "µs per token", "vs_smallest_N": "time vs its smallest N",
                  "naive_over_pkm": "full scoring / pkm", "dense_over_sparse": "dense / sparse values"}

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


class MemoryRegressor(nn.Module):
  """y = x + m(x): one product-key memory layer with a residual; returns (y, aux)."""

  d_model: int
  num_keys: int
  k: int
  d_key: int = QUERY_DIM

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True):
    memory = layers.ProductKeyMemory(d_model=self.d_model, num_keys=self.num_keys, k=self.k,
                                     num_heads=1, d_key=self.d_key, name="memory")
    y_BTD, aux = memory(x_BTD, deterministic=deterministic)
    return x_BTD + y_BTD, aux


class RegressionTask:
  """What `trainer.make_train_step` needs of a task for `MemoryRegressor`: apply, and the loss
  mean (y - target)^2."""

  def __init__(self, model: nn.Module):
    self.model = model

  def apply(self, variables, batch, **kwargs):
    return self.model.apply(variables, batch["inputs"], **kwargs)

  def loss(self, outputs, batch):
    return jnp.mean((outputs - batch["targets"]) ** 2), {}


def train_config(memory_values: str, rows: int) -> ml_collections.ConfigDict:
  """config.train for `optim.make_optimizer`: constant TRAIN_LEARNING_RATE, AdamW with
  TRAIN_WEIGHT_DECAY, clipping at 1, value tables "dense" or "sparse" (`rows` per step)."""
  return ml_collections.ConfigDict(dict(
      num_steps=1000, learning_rate=TRAIN_LEARNING_RATE, warmup_steps=0, end_lr_fraction=1.0,
      weight_decay=TRAIN_WEIGHT_DECAY, b1=0.9, b2=0.999, grad_clip=1.0,
      memory_value_learning_rate=None, memory_values=memory_values, memory_value_rows=rows))


@functools.lru_cache(maxsize=None)
def _jitted_init(model: nn.Module) -> Callable:
  """jax.jit(model.init), one per model config: the sparse and dense setups compile it once."""
  return jax.jit(model.init)


def train_setup(num_keys: int, tokens: int, k: int, memory_values: str = "sparse",
                d_model: int = VALUE_DIM, d_key: int = QUERY_DIM) -> tuple[Callable, dict, dict]:
  """(jitted trainer step with the state donated, initial state, batch) for `MemoryRegressor`."""
  model = MemoryRegressor(d_model=d_model, num_keys=num_keys, k=k, d_key=d_key)
  rngs = jax.random.split(jax.random.key(num_keys), 3)
  batch = {"inputs": jax.random.normal(rngs[0], (1, tokens, d_model)),
           "targets": jax.random.normal(rngs[1], (1, tokens, d_model))}
  tx, schedule = optim.make_optimizer(train_config(memory_values, tokens * k))
  params = nn.meta.unbox(_jitted_init(model)(rngs[2], batch["inputs"])["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
           "opt_state": tx.init(params), "rng": jax.random.key(0)}
  step = trainer.make_train_step(RegressionTask(model), tx, schedule,
                                 value_rows=memory_values == "sparse")
  return jax.jit(step, donate_argnums=0), state, batch


def _train_call(num_keys: int, tokens: int, k: int,
                memory_values: str) -> tuple[Callable[[], Any], int | None]:
  """(a call running one donated trainer step on the state the previous call left, peak bytes)."""
  step, state, batch = train_setup(num_keys, tokens, k, memory_values)
  compiled = step.lower(state, batch).compile()
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["train/loss"])

  return call, timing.compiled_peak_bytes(compiled)


def run_train(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """Rows for `pkm_train_step_N{N}` (sparse values) and `pkm_train_step_dense_N{N}`, each group
  timed interleaved on its own, with us_per_token, `vs_smallest_N` (within the group) and, on
  the sparse rows, `dense_over_sparse`."""
  num_keys_list, tokens, k = ((QUICK_TRAIN_NUM_KEYS, QUICK_TOKENS, QUICK_TOP_K) if quick
                              else (TRAIN_NUM_KEYS, TOKENS, TOP_K))
  rows = []
  for memory_values, prefix in (("sparse", "pkm_train_step"), ("dense", "pkm_train_step_dense")):
    calls, peaks = {}, {}
    for num_keys in num_keys_list:
      name = f"{prefix}_N{num_keys**2}"
      calls[name], peaks[name] = _train_call(num_keys, tokens, k, memory_values)
    group = timing.interleaved_calls(calls, repeats=repeats, warmup=2)
    for row in group:
      row["peak_bytes"] = peaks[row["case"]]
      row["us_per_token"] = row["median_s"] / tokens * 1e6
      row["vs_smallest_N"] = row["median_s"] / group[0]["median_s"]
    rows += group
    del calls  # frees this group's states (3 N x D tables each) before the next group
  for sparse, dense in zip(rows[:len(num_keys_list)], rows[len(num_keys_list):]):
    sparse["dense_over_sparse"] = dense["median_s"] / sparse["median_s"]
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
