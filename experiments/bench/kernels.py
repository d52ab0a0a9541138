"""CPU kernels, fp32, forward + backward: block-sparse matmul vs dense, gmm vs ragged_dot.

Block-sparse: y = x W and both gradients, M = K = N = 2048, 128 x 128 blocks, a uniformly random
block mask holding exactly round(d R C) blocks, d in {10, 25, 50, 100} %, against the dense
matmul of the same shape (`jax.vjp(jnp.matmul)`). gmm: a dropless-MoE shape, M = 8192 rows
sorted into G = 32 groups of random (Dirichlet) sizes, K = 256, N = 512, against
`jax.lax.ragged_dot` with its own VJP; its row also gives `time_vs_same_flops_dense`, its time
over that of one dense `[M, K] x [K, N]` matmul (the same FLOPs, the floor for any grouped
matmul). The kernels run `implementation="auto"`: on CPU the XLA implementation, which at
100 % density multiplies the densified weight. Targets: block-sparse >= 4x / 2x / 1.2x faster
than dense at 10 / 25 / 50 % and within 1.2x of it at 100 %; gmm >= 10x faster than ragged_dot.
All cases (and the same-FLOPs dense matmul) are timed interleaved (`timing.interleaved_cases`:
a warm-up round, then `--repeats` rounds of every case in turn; median_s, min_s, max_s).

    python -m experiments.bench kernels [--json FILE] [--repeats N] [--quick]
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from kernels.gmm import gmm

DESCRIPTION = ("fp32 fwd+bwd on CPU: block-sparse matmul (2048^3, 128x128 blocks) vs dense; "
               "gmm (M=8192, K=256, N=512, G=32) vs jax.lax.ragged_dot")
BASELINE = "dense_matmul"
DENSITIES = (0.10, 0.25, 0.50, 1.00)
# Minimum speedup over the case's baseline; at 100 % density "within 1.2x of dense".
TARGETS = {"block_sparse_d10": 4.0, "block_sparse_d25": 2.0, "block_sparse_d50": 1.2,
           "block_sparse_d100": 1 / 1.2, "gmm": 10.0}

_FULL = {"matmul": 2048, "block": 128, "gmm": (8192, 256, 512, 32)}
_QUICK = {"matmul": 256, "block": 32, "gmm": (512, 32, 64, 8)}
# Timed with the others for gmm's time_vs_same_flops_dense; not reported as a row.
SAME_FLOPS_DENSE = "dense_matmul_same_flops_as_gmm"


def forward_backward(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  """fn's output and the gradients of its first two arguments for a cotangent equal to it."""

  def run(a, b, *rest):
    y, vjp = jax.vjp(lambda a, b: fn(a, b, *rest), a, b)
    return y, *vjp(y)

  return run


def random_block_mask(grid: int, density: float, rng: np.random.Generator) -> np.ndarray:
  """A [grid, grid] bool mask with exactly round(density grid^2) True blocks, uniformly placed."""
  mask = np.zeros(grid * grid, bool)
  mask[rng.choice(grid * grid, round(density * grid * grid), replace=False)] = True
  return mask.reshape(grid, grid)


def random_group_sizes(rows: int, groups: int, rng: np.random.Generator) -> np.ndarray:
  """Group sizes summing to `rows`, imbalanced as a router's are (Dirichlet(2) proportions)."""
  return rng.multinomial(rows, rng.dirichlet(np.full(groups, 2.0))).astype(np.int32)


def run(repeats: int, quick: bool) -> list[dict]:
  """The dense, block-sparse, gmm and ragged_dot rows (see the module docstring), all timed
  interleaved."""
  shapes = _QUICK if quick else _FULL
  rng = np.random.default_rng(0)
  cases, extra = _block_sparse_cases(shapes["matmul"], shapes["block"], rng)
  gmm_cases, gmm_extra = _gmm_cases(*shapes["gmm"], rng)
  rows = timing.interleaved_cases({**cases, **gmm_cases}, repeats=repeats)
  extra.update(gmm_extra)
  by_case = {row["case"]: {**row, **extra[row["case"]]} for row in rows}
  same_flops = by_case.pop(SAME_FLOPS_DENSE)
  by_case["gmm"]["time_vs_same_flops_dense"] = by_case["gmm"]["median_s"] / same_flops["median_s"]
  return [_with_speedup(row, by_case[row["vs"]]) if "vs" in row else row
          for row in by_case.values()]


def _block_sparse_cases(size: int, block: int, rng: np.random.Generator):
  """({name: (fn, args)}, {name: extra columns}) for the dense and block-sparse matmuls."""
  x_MK = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
  w_KN = jnp.asarray(rng.normal(size=(size, size)) / np.sqrt(size), jnp.float32)
  cases = {BASELINE: (forward_backward(jnp.matmul), (x_MK, w_KN))}
  extra = {BASELINE: {"shape": f"{size}^3", "density": 1.0}}
  for density in DENSITIES:
    schedule = build_block_schedule(random_block_mask(size // block, density, rng))
    blocks_Zkn = jnp.asarray(rng.normal(size=(schedule.num_blocks, block, block)) / np.sqrt(size),
                             jnp.float32)
    name = f"block_sparse_d{round(density * 100)}"
    cases[name] = (forward_backward(block_sparse_matmul), (x_MK, blocks_Zkn, schedule))
    extra[name] = {"shape": f"{size}^3 / {block}x{block}", "density": density, "vs": BASELINE}
  return cases, extra


def _gmm_cases(num_rows: int, contract: int, out_dim: int, groups: int,
               rng: np.random.Generator):
  """The gmm, ragged_dot and same-FLOPs dense matmul cases, as `_block_sparse_cases`."""
  lhs_MK = jnp.asarray(rng.normal(size=(num_rows, contract)), jnp.float32)
  rhs_GKN = jnp.asarray(rng.normal(size=(groups, contract, out_dim)) / np.sqrt(contract),
                        jnp.float32)
  group_sizes_G = jnp.asarray(random_group_sizes(num_rows, groups, rng))
  shape = {"shape": f"M={num_rows} K={contract} N={out_dim} G={groups}"}
  cases = {"gmm": (forward_backward(gmm), (lhs_MK, rhs_GKN, group_sizes_G)),
           "ragged_dot": (forward_backward(jax.lax.ragged_dot), (lhs_MK, rhs_GKN, group_sizes_G)),
           SAME_FLOPS_DENSE: (forward_backward(jnp.matmul), (lhs_MK, rhs_GKN[0]))}
  return cases, {"gmm": {**shape, "vs": "ragged_dot"}, "ragged_dot": shape, SAME_FLOPS_DENSE: {}}


def _with_speedup(row: dict, baseline: dict) -> dict:
  """The row plus its speedup over `baseline`, the target and whether it is met."""
  speedup = baseline["median_s"] / row["median_s"]
  target = TARGETS[row["case"]]
  return {**row, "speedup": speedup, "target": target, "met": bool(speedup >= target)}
