"""GPU kernels, bf16: TFLOP/s of gmm vs jax.lax.ragged_dot and of block-sparse vs dense matmul.

On a GPU:

    python -m experiments.bench.gpu_kernels [--json FILE] [--repeats N]

checks every Pallas (Triton) kernel's output and gradients against its baseline, then times the
forward pass and forward + backward of: the dense matmul M = K = N = 8192; the block-sparse
matmul of the same shape with 128 x 128 blocks at 10 / 25 / 50 / 100 % block density (uniformly
random masks); gmm at a fine-grained MoE shape, M = 16384 rows in G = 64 groups of random
(Dirichlet) sizes, K = 2048, N = 1408; and `jax.lax.ragged_dot` at that shape. TFLOP/s count the
useful FLOPs only (2 M K N for dense, 2 M Z bk bn for block-sparse, 2 M K N for gmm; three times
that forward + backward).

`--tiny` runs tiny shapes with the GPU kernels in the Pallas interpreter, on any machine, to
check the script itself. The module is also a benchmark: `python -m experiments.bench
gpu_kernels [--quick]` (--quick is --tiny).
"""
import argparse
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from experiments.bench.__main__ import format_table
from experiments.bench.kernels import forward_backward, random_block_mask, random_group_sizes
from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from kernels.gmm import gmm

DESCRIPTION = ("bf16 on GPU: TFLOP/s of block-sparse matmul (8192^3, 128x128 blocks) vs dense "
               "and of gmm (M=16384, K=2048, N=1408, G=64) vs jax.lax.ragged_dot")
BASELINE = "dense_matmul_fwd"
DENSITIES = (0.10, 0.25, 0.50, 1.00)
TOLERANCE = 2e-2  # max |kernel - baseline| / max |baseline| in bf16

_FULL = {"matmul": 8192, "block": 128, "gmm": (16384, 2048, 1408, 64)}
_TINY = {"matmul": 128, "block": 32, "gmm": (96, 32, 48, 4)}


def run(repeats: int, quick: bool) -> list[dict]:
  """Correctness-checked, timed rows for every case; `quick` = tiny shapes, interpreted."""
  if not quick and jax.default_backend() != "gpu":
    raise ValueError(f"gpu_kernels needs a GPU (this platform is {jax.default_backend()!r}); "
                     "pass --tiny (--quick under experiments.bench) to run tiny shapes in the "
                     "Pallas interpreter")
  shapes = _TINY if quick else _FULL
  options = dict(implementation="pallas", platform="gpu", interpret=quick)
  rng = np.random.default_rng(0)
  rows = _matmul_rows(shapes["matmul"], shapes["block"], options, repeats, rng)
  rows += _gmm_rows(*shapes["gmm"], options, repeats, rng)
  return rows


def _matmul_rows(size: int, block: int, options: dict, repeats: int, rng):
  x_MK = _normal(rng, size, size)
  w_KN = _normal(rng, size, size, scale=size ** -0.5)
  flops = 2 * size ** 3
  rows = _cases("dense_matmul", jnp.matmul, None, (x_MK, w_KN), flops, repeats)
  for density in DENSITIES:
    schedule = build_block_schedule(random_block_mask(size // block, density, rng))
    blocks_Zkn = _normal(rng, schedule.num_blocks, block, block, scale=size ** -0.5)
    kernel = lambda x, b, s: block_sparse_matmul(x, b, s, **options)
    reference = lambda x, b, s: block_sparse_matmul(x, b, s, implementation="reference")
    rows += _cases(f"block_sparse_d{round(density * 100)}", kernel, reference,
                   (x_MK, blocks_Zkn, schedule), 2 * size * schedule.num_blocks * block ** 2,
                   repeats, density=density)
  return rows


def _gmm_rows(num_rows: int, contract: int, out_dim: int, groups: int, options: dict,
              repeats: int, rng):
  args = (_normal(rng, num_rows, contract),
          _normal(rng, groups, contract, out_dim, scale=contract ** -0.5),
          jnp.asarray(random_group_sizes(num_rows, groups, rng)))
  flops = 2 * num_rows * contract * out_dim
  kernel = lambda a, b, s: gmm(a, b, s, **options)
  return (_cases("gmm", kernel, jax.lax.ragged_dot, args, flops, repeats)
          + _cases("ragged_dot", jax.lax.ragged_dot, None, args, flops, repeats))


def _cases(name: str, fn: Callable[..., Any], reference: Callable[..., Any] | None, args: tuple,
           flops: int, repeats: int, **extra) -> list[dict]:
  """Rows `name`_fwd and `name`_fwdbwd, with TFLOP/s and, given a reference, the max relative
  error of the outputs (and gradients) against it."""
  rows = []
  for suffix, pass_fn, pass_flops in (("fwd", fn, flops), ("fwdbwd", forward_backward(fn),
                                                           3 * flops)):
    row = timing.case(f"{name}_{suffix}", pass_fn, *args, repeats=repeats, **extra)
    row["tflops"] = pass_flops / row["median_s"] / 1e12
    if reference is not None:
      reference_fn = reference if suffix == "fwd" else forward_backward(reference)
      row["max_rel_err"] = _max_relative_error(jax.jit(pass_fn)(*args),
                                               jax.jit(reference_fn)(*args))
      row["ok"] = bool(row["max_rel_err"] <= TOLERANCE)
    rows.append(row)
  return rows


def _max_relative_error(actual, expected) -> float:
  """max over outputs of max |actual - expected| / max |expected| (NaN counts as failure)."""
  errors = []
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    error = np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e), initial=0.0), 1e-30)
    errors.append(float(error) if np.all(np.isfinite(a)) else float("inf"))
  return max(errors)


def _normal(rng, *shape, scale: float = 1.0) -> jax.Array:
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench.gpu_kernels",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny shapes, GPU kernels in the Pallas interpreter (any machine)")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats} must be >= 1")
  try:
    rows = run(args.repeats, args.tiny)
  except ValueError as e:
    parser.error(str(e))
  print(format_table(rows, BASELINE))
  if args.json:
    import json  # pylint: disable=g-import-not-at-top
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  failed = [r["case"] for r in rows if r.get("ok") is False]
  if failed:
    print(f"error: outputs differ from the baseline beyond {TOLERANCE}: {', '.join(failed)}",
          file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
