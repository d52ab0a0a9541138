"""`BlockSparseLinear`: a Flax Linen dense layer whose weight exists only on a block mask.

The layer is thin: it owns the stored blocks (and a bias) and calls
`kernels.block_sparse.block_sparse_matmul`, whose structure comes from a static NumPy block mask
turned into a `BlockSchedule` on the host at trace time.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import DEFAULT_TILE_M, block_sparse_matmul


class BlockSparseLinear(nn.Module):
  """y = x W + b with W `[K, N]` block-sparse: only the blocks where `block_mask` is True exist.

  With block_mask `[R, C]` and block_shape (bk, bn): K = R bk, N = C bn, and the param `blocks`
  `[Z, bk, bn]` holds the Z True blocks in row-major order. `__call__(x [..., K])` returns
  `(y [..., N], aux)` with aux = {"losses": {}, "metrics": {"density": Z / (R C)}} (the
  `sparsejax.auxiliary` contract). Params are float32, annotated with logical axes, and cast to
  `dtype` for the matmul. Default init: truncated normal of variance 1 / fan_in with
  fan_in = Z bk / C, the mean number of inputs an output sees (LeCun init of the sparse layer).
  Gray, Radford & Kingma 2017, "GPU Kernels for Block-Sparse Weights".

  Attributes:
    block_mask: static NumPy bool array `[R, C]`.
    block_shape: (bk, bn).
    use_bias: add a bias `[N]`.
    dtype: compute dtype.
    kernel_init: init of `blocks` (shape `[Z, bk, bn]`); None for the default above.
    bias_init: init of `bias`.
    blocks_axes: logical axis names of `blocks`.
    bias_axes: logical axis names of `bias`.
    implementation, interpret, tile_m: passed to `block_sparse_matmul`.
  """
  block_mask: np.ndarray
  block_shape: tuple[int, int]
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  blocks_axes: tuple[str | None, ...] = (None, "embed", "mlp")
  bias_axes: tuple[str | None, ...] = ("mlp",)
  implementation: str = "auto"
  interpret: bool = False
  tile_m: int = DEFAULT_TILE_M

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, dict[str, Any]]]:
    if len(self.block_shape) != 2 or min(self.block_shape) < 1:
      raise ValueError(f"block_shape must be two positive ints (bk, bn), got {self.block_shape}")
    schedule = build_block_schedule(self.block_mask)
    (num_rows, num_cols), (bk, bn) = schedule.grid_shape, self.block_shape
    if x.shape[-1] != num_rows * bk:
      raise ValueError(f"x's last dim must be R bk = {num_rows} x {bk} = {num_rows * bk}, got "
                       f"shape {x.shape}")
    init = self.kernel_init or _sparse_lecun_normal(schedule.num_blocks, num_cols)
    blocks_Zkn = self.param("blocks", nn.with_logical_partitioning(init, self.blocks_axes),
                            (schedule.num_blocks, bk, bn), jnp.float32)
    x_MK = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    y_MN = block_sparse_matmul(x_MK, blocks_Zkn.astype(self.dtype), schedule,
                               implementation=self.implementation, interpret=self.interpret,
                               tile_m=self.tile_m)
    if self.use_bias:
      bias_N = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.bias_axes),
                          (num_cols * bn,), jnp.float32)
      y_MN = y_MN + bias_N.astype(self.dtype)
    y = y_MN.reshape(x.shape[:-1] + (num_cols * bn,))
    aux = {"losses": {}, "metrics": {"density": jnp.asarray(schedule.density, jnp.float32)}}
    return y, aux


def _sparse_lecun_normal(num_blocks: int, num_cols: int) -> nn.initializers.Initializer:
  """Truncated normal of variance 1 / (Z bk / C) for blocks `[Z, bk, bn]`.

  variance_scaling divides its scale by the fan-in it reads off the shape, bk; the scale C / Z
  makes the variance C / (Z bk).
  """
  return nn.initializers.variance_scaling(num_cols / max(num_blocks, 1), "fan_in",
                                          "truncated_normal", in_axis=-2, out_axis=-1,
                                          batch_axis=(0,))
