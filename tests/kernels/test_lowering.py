"""Smoke test: the TPU (Mosaic) and GPU (Triton) kernels lower for their platforms from a CPU host.

Lowering runs the Pallas-to-Mosaic/Triton compilers, so wrong block shapes (not (8, 128)
tileable on TPU, not powers of two on GPU) or unsupported ops fail here without a TPU or GPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from kernels.gmm import gmm, tgmm

# Export platform, the custom call it must contain, and checks to disable (Triton kernels have
# no serialization compatibility guarantee).
PLATFORMS = {
    "tpu": ("tpu", "tpu_custom_call", []),
    "gpu": ("cuda", "__gpu$xla.gpu.triton",
            [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]),
}


def _export_forward_backward(fn, platform, *args):
  export_platform, custom_call, disabled = PLATFORMS[platform]

  def forward_backward(a, b, *rest):
    y, vjp = jax.vjp(lambda a, b: fn(a, b, *rest), a, b)
    return y, *vjp(y)

  exported = jax.export.export(jax.jit(forward_backward), platforms=[export_platform],
                               disabled_checks=disabled)(*args)
  return exported.mlir_module().count(custom_call)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_gmm_and_tgmm_lower(platform):
  lhs = jax.ShapeDtypeStruct((200, 136), jnp.bfloat16)  # M, K not multiples of 128
  rhs = jax.ShapeDtypeStruct((4, 136, 96), jnp.bfloat16)
  grad = jax.ShapeDtypeStruct((200, 96), jnp.bfloat16)
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
  options = dict(implementation="pallas", platform=platform)
  # gmm forward + (gmm^T, tgmm) backward; tgmm forward + two gmm backward.
  assert _export_forward_backward(lambda a, b, s: gmm(a, b, s, **options), platform,
                                  lhs, rhs, sizes) == 3
  assert _export_forward_backward(lambda a, b, s: tgmm(a, b, s, **options), platform,
                                  lhs, grad, sizes) == 3


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_block_sparse_matmul_lowers(platform):
  mask = np.random.default_rng(0).random((3, 4)) < 0.5
  mask[:, 1] = False
  schedule = build_block_schedule(mask)
  x = jax.ShapeDtypeStruct((200, 3 * 128), jnp.bfloat16)
  blocks = jax.ShapeDtypeStruct((schedule.num_blocks, 128, 128), jnp.bfloat16)
  fn = lambda x, b: block_sparse_matmul(x, b, schedule, implementation="pallas",
                                        platform=platform)
  assert _export_forward_backward(fn, platform, x, blocks) == 3  # y, dx, dblocks
