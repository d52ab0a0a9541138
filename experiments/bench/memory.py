"""Product-key memory read, forward + backward: time per token grows ~ sqrt(N), not N.

`python -m experiments.bench memory [--json FILE] [--quick]`

What is measured, per memory size N = P^2 (k = 32 slots per token, one head, query dim Q = 128,
value dim D = 128, B = 256 tokens; `--quick`: N = 16^2..128^2, k = 8, B = 32): one jitted call
that reads the memory and back-propagates a fixed output cotangent to the query, the sub-keys
and the gathered value rows, returning (out, d query, d sub-keys, idx, d rows): the sparse
value gradient that a row-sparse optimizer consumes.

* `pkm_N{N}`: `sparsejax.memory.pkm_lookup` (top-k of each half, top-k of ~k ln k candidate
  sums) then the embedding-bag read. Cost O(P Q + k D) per token.
* `naive_N{N}`: the baseline — the same product keys, but every one of the N scores
  s1_i + s2_j is formed (s1, s2 from `pkm.half_scores`, so Q-dim dot products are still
  only 2P per token) and `lax.top_k` runs over all N; same read. O(N) per token. Skipped when
  its N-wide score, cotangent and top-k buffers (~3 B N 4 bytes) exceed 4 GiB.
* `pkm_densegrad_N{N}`: `jax.grad` of `pkm_read` w.r.t. query, sub-keys and the whole value
  table, as a training step with a dense optimizer computes it: the N x D value gradient is
  materialised, so this grows with N through that one zero-filled buffer.

Extra columns: `us_per_token`, `vs_smallest_N` (this method's time / its time at the smallest
N, both from this run), `naive_over_pkm` (naive time / pkm time at the same N) and
`temp_bytes` (XLA's temporaries, excluding the arguments, of which the N x D table is one).
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments.bench import timing
from sparsejax.memory import pkm

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


def _measure(name: str, fn: Callable, args: tuple, repeats: int, tokens: int) -> dict[str, Any]:
  """One row: median seconds of the compiled `fn(*args)`, its peak and temporary bytes."""
  compiled = jax.jit(fn).lower(*args).compile()
  median_s = timing.time_jitted(compiled, *args, repeats=repeats)
  stats = compiled.memory_analysis()
  return {
      "case": name,
      "median_s": median_s,
      "peak_bytes": timing.peak_bytes(fn, *args),
      "temp_bytes": None if stats is None else int(stats.temp_size_in_bytes),
      "us_per_token": median_s / tokens * 1e6,
  }


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
  rows = []
  for num_keys in num_keys_list:
    size = num_keys**2
    args = _inputs(num_keys, tokens)
    rows.append(_measure(
        f"pkm_N{size}", functools.partial(sparse_read_fwd_bwd, pkm.pkm_lookup, k), args,
        repeats, tokens))
    if 3 * tokens * size * 4 <= NAIVE_BUDGET_BYTES:
      rows.append(_measure(
          f"naive_N{size}", functools.partial(sparse_read_fwd_bwd, naive_lookup, k), args,
          repeats, tokens))
    rows.append(_measure(
        f"pkm_densegrad_N{size}", functools.partial(dense_grad_fwd_bwd, k), args, repeats,
        tokens))
    del args
  _add_ratios(rows)
  return rows
