"""GPU kernels, bf16: TFLOP/s of gmm vs jax.lax.ragged_dot, of block-sparse vs dense matmul and
of block-sparse vs dense causal attention.

On a GPU:

    python -m experiments.bench.gpu_kernels [--json FILE] [--repeats N]

checks every Pallas (Triton) kernel's output and gradients against its baseline, then times the
forward pass and forward + backward of: the dense matmul M = K = N = 8192; the block-sparse
matmul of the same shape with 128 x 128 blocks at 10 / 25 / 50 / 100 % block density (uniformly
random masks); gmm at a fine-grained MoE shape, M = 16384 rows in G = 64 groups of random
(Dirichlet) sizes, K = 2048, N = 1408; `jax.lax.ragged_dot` at that shape; dense causal
attention, B = 1, L = 8192, 8 heads of 64, by `jax.nn.dot_product_attention(is_causal=True,
implementation="cudnn")` (XLA's under --tiny); and block-sparse attention (Pallas, fwd and
fwd + bwd) of the same shape with 128 x 128 blocks keeping 10 / 25 / 50 / 100 % of the causal
blocks (each head: the diagonal plus random blocks below it, as `experiments.bench.attention`;
--tiny: 10 and 100 % only), its attention_speedup the dense attention's time over its own. TFLOP/s count the useful FLOPs
only (2 M K N for dense, 2 M Z bk bn for block-sparse, 2 M K N for gmm, three times that
forward + backward; 4 K per attended (query, key) pair for attention, 3.5 times that forward +
backward as in FlashAttention-2). All cases are timed interleaved (`timing.interleaved_cases`:
a warm-up round, then `--repeats` rounds of every case in turn; median_s, min_s, max_s), then
checked.

`--tiny` runs tiny shapes with the GPU kernels in the Pallas interpreter, on any machine, to
check the script itself. The module is also a benchmark: `python -m experiments.bench
gpu_kernels [--quick]` (--quick is --tiny).
"""
import argparse
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from experiments.bench.__main__ import format_table
from experiments.bench.attention import causal_block_mask
from experiments.bench.kernels import forward_backward, random_block_mask, random_group_sizes
from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from kernels.block_sparse_attention import block_sparse_attention, build_attention_schedule
from kernels.gmm import gmm
from sparsejax.attention.patterns import block_layout, blocks, causal

DESCRIPTION = ("bf16 on GPU: TFLOP/s of block-sparse matmul (8192^3, 128x128 blocks) vs dense, "
               "of gmm (M=16384, K=2048, N=1408, G=64) vs jax.lax.ragged_dot and of "
               "block-sparse causal attention (L=8192, 8x64 heads) vs cuDNN dense attention")
BASELINE = "dense_matmul_fwd"
DENSITIES = (0.10, 0.25, 0.50, 1.00)
TOLERANCE = 2e-2  # max |kernel - baseline| / max |baseline| in bf16

# attention: (L, block, heads, head dim, densities); tiny keeps R = 32 blocks so that 10 % covers
# the diagonal, and two densities (each compiles three interpreted kernels).
_FULL = {"matmul": 8192, "block": 128, "gmm": (16384, 2048, 1408, 64),
         "attention": (8192, 128, 8, 64, DENSITIES)}
_TINY = {"matmul": 128, "block": 32, "gmm": (96, 32, 48, 4),
         "attention": (512, 16, 1, 16, (0.10, 1.00))}


def run(repeats: int, quick: bool) -> list[dict]:
  """Correctness-checked, timed rows for every case; `quick` = tiny shapes, interpreted."""
  if not quick and jax.default_backend() != "gpu":
    raise ValueError(f"gpu_kernels needs a GPU (this platform is {jax.default_backend()!r}); "
                     "pass --tiny (--quick under experiments.bench) to run tiny shapes in the "
                     "Pallas interpreter")
  shapes = _TINY if quick else _FULL
  options = dict(implementation="pallas", platform="gpu", interpret=quick)
  rng = np.random.default_rng(0)
  specs = _matmul_specs(shapes["matmul"], shapes["block"], options, rng)
  specs |= _gmm_specs(*shapes["gmm"], options, rng)
  specs |= _attention_specs(*shapes["attention"], options, rng)
  rows = timing.interleaved_cases({name: (spec["fn"], spec["args"])
                                   for name, spec in specs.items()}, repeats=repeats)
  for row in rows:
    row.update(_checked(specs[row["case"]], row["median_s"]))
  dense_attn_s = {r["case"].rsplit("_", 1)[1]: r["median_s"] for r in rows
                  if r["case"].startswith("dense_attn")}
  for row in rows:
    if "attn" in row["case"]:
      row["attention_speedup"] = dense_attn_s[row["case"].rsplit("_", 1)[1]] / row["median_s"]
  return rows


def _matmul_specs(size: int, block: int, options: dict, rng):
  x_MK = _normal(rng, size, size)
  w_KN = _normal(rng, size, size, scale=size ** -0.5)
  specs = _specs("dense_matmul", jnp.matmul, None, (x_MK, w_KN), 2 * size ** 3)
  for density in DENSITIES:
    schedule = build_block_schedule(random_block_mask(size // block, density, rng))
    blocks_Zkn = _normal(rng, schedule.num_blocks, block, block, scale=size ** -0.5)
    kernel = lambda x, b, s: block_sparse_matmul(x, b, s, **options)
    reference = lambda x, b, s: block_sparse_matmul(x, b, s, implementation="reference")
    specs |= _specs(f"block_sparse_d{round(density * 100)}", kernel, reference,
                    (x_MK, blocks_Zkn, schedule), 2 * size * schedule.num_blocks * block ** 2,
                    density=density)
  return specs


def _gmm_specs(num_rows: int, contract: int, out_dim: int, groups: int, options: dict, rng):
  args = (_normal(rng, num_rows, contract),
          _normal(rng, groups, contract, out_dim, scale=contract ** -0.5),
          jnp.asarray(random_group_sizes(num_rows, groups, rng)))
  flops = 2 * num_rows * contract * out_dim
  kernel = lambda a, b, s: gmm(a, b, s, **options)
  return (_specs("gmm", kernel, jax.lax.ragged_dot, args, flops)
          | _specs("ragged_dot", jax.lax.ragged_dot, None, args, flops))


def _attention_specs(seq_len: int, block: int, heads: int, head_dim: int, densities: tuple,
                     options: dict, rng):
  """dense_attn and block_sparse_attn_d{N} cases, fwd and fwdbwd (see the module docstring)."""
  qkv = tuple(_normal(rng, 1, heads, seq_len, head_dim) for _ in range(3))
  dense = functools.partial(_dense_causal_attention,
                            implementation=None if options["interpret"] else "cudnn")
  grad_options = dict(grads=_attention_forward_backward, backward_flops=2.5)
  specs = _specs("dense_attn", dense, None, qkv,
                 4 * head_dim * heads * seq_len * (seq_len + 1) // 2, **grad_options)
  kernel = lambda q, k, v, s: block_sparse_attention(q, k, v, s, **options)
  reference = lambda q, k, v, s: block_sparse_attention(q, k, v, s, implementation="reference")
  for density in densities:
    mask_HRR = causal_block_mask(heads, seq_len // block, density, rng)
    layout = block_layout(causal() & blocks(mask_HRR, block), seq_len, block)
    schedule = build_attention_schedule(layout.tile, layout.tiles, seq_len)
    pairs = int(np.asarray(schedule.tiles_Uqk)[np.asarray(schedule.tile_Z)].sum())
    specs |= _specs(f"block_sparse_attn_d{round(density * 100)}", kernel, reference,
                    (*qkv, schedule), 4 * head_dim * pairs, density=density, **grad_options)
  return specs


def _dense_causal_attention(q_BHTK, k_BHTK, v_BHTK, implementation):
  """`jax.nn.dot_product_attention(..., is_causal=True)` on `[B, H, T, K]` arrays."""
  o_BTHK = jax.nn.dot_product_attention(*(x.swapaxes(1, 2) for x in (q_BHTK, k_BHTK, v_BHTK)),
                                        is_causal=True, implementation=implementation)
  return o_BTHK.swapaxes(1, 2)


def _attention_forward_backward(attention: Callable[..., Any]) -> Callable[..., Any]:
  """attention's output and the gradients of q, k, v for a cotangent equal to it."""

  def run(q_BHTK, k_BHTK, v_BHTK, *rest):
    o_BHTK, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *rest), q_BHTK, k_BHTK, v_BHTK)
    return o_BHTK, *vjp(o_BHTK)

  return run


def _specs(name: str, fn: Callable[..., Any], reference: Callable[..., Any] | None, args: tuple,
           flops: int, grads: Callable[..., Any] = forward_backward,
           backward_flops: float = 2.0, **extra) -> dict[str, dict]:
  """Cases `name`_fwd and `name`_fwdbwd: {case: {fn, reference, args, flops, extra}}.

  `grads(fn)` runs fn forward and backward, whose FLOPs are (1 + backward_flops) times the
  forward's; the reference (if any) is checked against in `_checked`.
  """
  return {f"{name}_fwd": dict(fn=fn, reference=reference, args=args, flops=flops, extra=extra),
          f"{name}_fwdbwd": dict(fn=grads(fn), reference=reference and grads(reference),
                                 args=args, flops=(1 + backward_flops) * flops, extra=extra)}


def _checked(spec: dict, median_s: float) -> dict:
  """A case's extra columns, TFLOP/s and, given a reference, the max relative error against it."""
  columns = {**spec["extra"], "tflops": spec["flops"] / median_s / 1e12}
  if spec["reference"] is not None:
    error = _max_relative_error(jax.jit(spec["fn"])(*spec["args"]),
                                jax.jit(spec["reference"])(*spec["args"]))
    columns.update(max_rel_err=error, ok=bool(error <= TOLERANCE))
  return columns


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
