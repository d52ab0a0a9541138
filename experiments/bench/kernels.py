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
  """The dense, block-sparse, gmm and ragged_dot rows (see the module docstring)."""
  shapes = _QUICK if quick else _FULL
  rng = np.random.default_rng(0)
  rows = _block_sparse_rows(shapes["matmul"], shapes["block"], repeats, rng)
  rows += _gmm_rows(*shapes["gmm"], repeats, rng)
  return rows


def _block_sparse_rows(size: int, block: int, repeats: int, rng: np.random.Generator):
  x_MK = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
  w_KN = jnp.asarray(rng.normal(size=(size, size)) / np.sqrt(size), jnp.float32)
  dense = timing.case(BASELINE, forward_backward(jnp.matmul), x_MK, w_KN, repeats=repeats,
                      shape=f"{size}^3", density=1.0)
  rows = [dense]
  for density in DENSITIES:
    schedule = build_block_schedule(random_block_mask(size // block, density, rng))
    blocks_Zkn = jnp.asarray(rng.normal(size=(schedule.num_blocks, block, block)) / np.sqrt(size),
                             jnp.float32)
    name = f"block_sparse_d{round(density * 100)}"
    row = timing.case(name, forward_backward(block_sparse_matmul), x_MK, blocks_Zkn, schedule,
                      repeats=repeats, shape=f"{size}^3 / {block}x{block}", density=density)
    rows.append(_with_speedup(row, dense))
  return rows


def _gmm_rows(num_rows: int, contract: int, out_dim: int, groups: int, repeats: int,
              rng: np.random.Generator):
  lhs_MK = jnp.asarray(rng.normal(size=(num_rows, contract)), jnp.float32)
  rhs_GKN = jnp.asarray(rng.normal(size=(groups, contract, out_dim)) / np.sqrt(contract),
                        jnp.float32)
  group_sizes_G = jnp.asarray(random_group_sizes(num_rows, groups, rng))
  shape = f"M={num_rows} K={contract} N={out_dim} G={groups}"
  ragged = timing.case("ragged_dot", forward_backward(jax.lax.ragged_dot), lhs_MK, rhs_GKN,
                       group_sizes_G, repeats=repeats, shape=shape)
  ours = timing.case("gmm", forward_backward(gmm), lhs_MK, rhs_GKN, group_sizes_G,
                     repeats=repeats, shape=shape)
  dense_s = timing.time_jitted(jax.jit(forward_backward(jnp.matmul)), lhs_MK, rhs_GKN[0],
                               repeats=repeats)
  ours["time_vs_same_flops_dense"] = ours["median_s"] / dense_s
  return [_with_speedup(ours, ragged), ragged]


def _with_speedup(row: dict, baseline: dict) -> dict:
  """The row plus its speedup over `baseline`, the target and whether it is met."""
  speedup = baseline["median_s"] / row["median_s"]
  target = TARGETS[row["case"]]
  return {**row, "vs": baseline["case"], "speedup": speedup, "target": target,
          "met": bool(speedup >= target)}
