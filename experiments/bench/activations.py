"""Batch-1 decode of a sparse FFN on CPU, fp32, forward only: dense vs the gathered top-k paths.

`python -m experiments.bench activations [--json FILE] [--repeats N] [--quick]`

One token x [1, D], D = 1024, F = 4096 hidden units, gelu, k = 410 (10 %) units kept, predictor
rank R = 128 (`--quick`: D = 16, F = 64, k = 6, R = 4); random weights (W_in ~ N(0, 1/D),
W_out ~ N(0, 1/F), an untrained predictor: timing does not depend on what it predicts). Each case
is one jitted call of a `sparsejax.activations.sparse_ffn` function, timed interleaved:

* `dense_ffn_b1` (the baseline): gelu(x W_in) W_out, two dense matrix-vector products.
* `topk_ffn_b1`: the exact top-k FFN's gathered path (`topk_ffn_gathered`): all of
  h = gelu(x W_in) (ranking needs every unit), top-k of |h|, then k rows of W_out
  (`gather_decode`). It reads F D + k D weights, 55 % of dense's 2 F D, so it cannot be 3x
  faster than dense: its bound is ~1.8x.
* `predicted_ffn_b1`: the predicted FFN's gathered path with its predictor
  (`predicted_ffn_gathered` on `gathered_params`): scores (x A) B, top-k of them, k rows of
  W_in^T (the columns of W_in, stored transposed once) and k rows of W_out: R (D + F) + 2 k D
  weights, 26 % of dense's.
* `predicted_ffn_b1_columns`: the same, on DenseFFN's layout, gathering k strided columns of
  W_in [D, F] (what the Linen module does): the cost of not transposing W_in.
* `given_set_ffn_b1`: only the gathered FFN (`gathered_ffn`, 2 k D weights, 10 %), the active
  set given (e.g. from a predictor run ahead, or reused across tokens): the floor of any
  gathered method at this k.

Each row carries `weights_MiB` (the weights it reads) and, against the baseline, `speedup`;
topk_ffn_b1 and predicted_ffn_b1 also `target` (3x and 2x, issue 14) and `met`. Before timing,
every gathered case is checked to equal the matching masked (dense) FFN within 1e-4 (relative
to its largest entry). All weights (33 MiB) fit in this CPU's L3, so the times compare
cache-resident reads.

Measured (`--repeats 50`, twice, on a shared 2-core x86 CPU at load average 18; dense median
2.15 / 2.07 ms), speedup over dense: topk_ffn_b1 1.66x / 1.88x (target 3x missed by 1.6-1.8x:
it reads 55 % of dense's weights, bound ~1.8x); predicted_ffn_b1 2.62x / 2.67x (target 2x
met); predicted_ffn_b1_columns 1.51x / 1.62x; given_set_ffn_b1 3.75x / 4.18x (reading 10 % of
the weights gives ~4x, not 10x: XLA CPU gathers rows ~4x slower per byte than a dense matvec
streams them).
"""
from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench import timing
from sparsejax.activations import sparse_ffn

DESCRIPTION = ("Batch-1 FFN decode on CPU (D=1024, F=4096, 10 % active, gelu): dense vs top-k "
               "and predicted gathered paths")
BASELINE = "dense_ffn_b1"
TARGETS = {"topk_ffn_b1": 3.0, "predicted_ffn_b1": 2.0}
TOLERANCE = 1e-4

_FULL = {"d": 1024, "f": 4096, "k": 410, "rank": 128}
_QUICK = {"d": 16, "f": 64, "k": 6, "rank": 4}


def init_params(key: jax.Array, d: int, f: int, rank: int) -> dict[str, jax.Array]:
  """W_in ~ N(0, 1/D), W_out ~ N(0, 1/F), predictor A ~ N(0, 1/D), B ~ N(0, 1/R)."""
  keys = jax.random.split(key, 4)
  shapes = {"wi": (d, f), "wo": (f, d), "predictor_a": (d, rank), "predictor_b": (rank, f)}
  return {name: jax.random.normal(k, shape) / jnp.sqrt(shape[0])
          for k, (name, shape) in zip(keys, shapes.items())}


def dense_ffn(params: dict[str, jax.Array], x_TD: jax.Array) -> jax.Array:
  """gelu(x W_in) W_out: the baseline a user writes."""
  return jax.nn.gelu(x_TD @ params["wi"], approximate=True) @ params["wo"]


def relative_difference(got: jax.Array, want: jax.Array) -> float:
  """max|got - want| / max|want|."""
  return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The five rows of the module docstring, after checking each gathered case's output."""
  shape = _QUICK if quick else _FULL
  d, f, k, rank = shape["d"], shape["f"], shape["k"], shape["rank"]
  key_params, key_x = jax.random.split(jax.random.key(0))
  params = init_params(key_params, d, f, rank)
  prepared = jax.block_until_ready(sparse_ffn.gathered_params(params))
  x_TD = jax.random.normal(key_x, (1, d))
  idx_TK = sparse_ffn.predicted_units(params, x_TD, k)
  cases = {
      BASELINE: (dense_ffn, (params, x_TD)),
      "topk_ffn_b1": (lambda p, x: sparse_ffn.topk_ffn_gathered(p, x, k), (params, x_TD)),
      "predicted_ffn_b1": (lambda p, x: sparse_ffn.predicted_ffn_gathered(p, x, k),
                           (prepared, x_TD)),
      "predicted_ffn_b1_columns": (lambda p, x: sparse_ffn.predicted_ffn_gathered(p, x, k),
                                   (params, x_TD)),
      "given_set_ffn_b1": (sparse_ffn.gathered_ffn, (prepared, x_TD, idx_TK)),
  }
  masked = {
      "topk_ffn_b1": sparse_ffn.topk_ffn(params, x_TD, k),
      "predicted_ffn_b1": sparse_ffn.predicted_ffn(params, x_TD, k)[0],
  }
  masked["predicted_ffn_b1_columns"] = masked["given_set_ffn_b1"] = masked["predicted_ffn_b1"]
  diffs = {}
  for name, want in masked.items():
    fn, args = cases[name]
    diffs[name] = relative_difference(jax.jit(fn)(*args), want)
    if not diffs[name] <= TOLERANCE:
      raise AssertionError(f"{name} differs from its masked FFN by {diffs[name]:.3g}")
  rows = timing.interleaved_cases(cases, repeats=repeats)
  weights = {BASELINE: 2 * f * d, "topk_ffn_b1": f * d + k * d,
             "predicted_ffn_b1": rank * (d + f) + 2 * k * d,
             "predicted_ffn_b1_columns": rank * (d + f) + 2 * k * d, "given_set_ffn_b1": 2 * k * d}
  base_s = rows[0]["median_s"]
  for row in rows:
    name = row["case"]
    row.update(shape=f"T=1 D={d} F={f} k={k} R={rank}", weights_MiB=4 * weights[name] / 2**20)
    if name != BASELINE:
      row.update(speedup=base_s / row["median_s"], max_rel_diff=diffs[name])
    if name in TARGETS:
      row.update(target=TARGETS[name], met=bool(row["speedup"] >= TARGETS[name]))
  return rows
