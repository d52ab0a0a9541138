"""Pixelated Butterfly linear layer: a fixed flat block butterfly kernel plus a low-rank term.

  y_BO = x_BI (M_IO ⊙ W_IO) + (x_BI U_IR) V_RO + b_O

M is the fixed flat block butterfly pattern `structures.pattern("butterfly", (I, O),
block=block, levels=levels)` (block (r, c) kept iff r ^ c is 0 or a power of two below
2^levels; all log2 levels by default), a NumPy constant, not a parameter. Only the kept blocks
of W exist: M is an n x n butterfly on blocks of (I / n, O / n) entries (n = the smaller side
of the block grid; rectangular grids stretch the square one), W is stored as those Z blocks
`[Z, I / n, O / n]` and the sparse term runs `kernels.block_sparse.block_sparse_matmul`, which
multiplies and differentiates only them. U `[I, R]`, V `[R, O]` are dense (R = `rank`; 0 drops
the term). Dao et al. 2022, "Pixelated Butterfly: Simple and Efficient Sparse Training for
Neural Network Models" (flat block butterfly + low rank).

Init: W truncated normal with variance 1 / (kept inputs per output, averaged over outputs), so
the sparse term has the variance of a dense LeCun-initialised layer; U LeCun normal over I; V
zeros, so at init y equals the sparse term (the low-rank term starts at zero, as in LoRA).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from sparsejax.masks import structures


def pixelfly_pattern(in_features: int, features: int, block: Any = 1,
                     levels: int | None = None) -> np.ndarray:
  """M_IO: the flat block butterfly pattern of an `[I, O]` kernel (clear error if the block grid
  is not a power of two dividing the larger side, see `structures`)."""
  return np.asarray(structures.pattern("butterfly", (in_features, features), None, block=block,
                                       levels=levels), bool)


def pixelfly_blocks(in_features: int, features: int, block: Any = 1,
                    levels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
  """(mask_nn, (I / n, O / n)): the pattern as an n x n block mask on its largest blocks.

  M_IO = kron(mask_nn, ones(I / n, O / n)), n = min of the `block` grid's sides.
  """
  mask_IO = pixelfly_pattern(in_features, features, block, levels)
  bk, bn = (block, block) if isinstance(block, (int, np.integer)) else block
  n = min(in_features // bk, features // bn)
  block_shape = (in_features // n, features // n)
  return mask_IO[::block_shape[0], ::block_shape[1]].copy(), block_shape


class PixelflyLinear(nn.Module):
  """y = x (M ⊙ W) + (x U) V + b, see the module docstring. Returns `(y [..., O], aux)` with
  aux = {"losses": {}, "metrics": {"density": kept fraction of M}}.

  Params: "blocks" `[Z, I / n, O / n]` (the kept blocks of W in row-major order, see
  `pixelfly_blocks`), "lowrank_u" and "lowrank_v" when rank > 0, "bias".

  Attributes:
    features: O.
    block: butterfly block size, an int b (b x b) or (bk, bn); it must tile `[I, O]`.
    rank: R, the rank of the dense low-rank term (0: butterfly only).
    levels: butterfly levels (None: all, log2 of the smaller block-grid side).
    use_bias: add a bias `[O]`.
    implementation: backend of `block_sparse_matmul` ("auto", "pallas", "xla", "reference").
  """
  features: int
  block: Any = 1
  rank: int = 0
  levels: int | None = None
  use_bias: bool = True
  dtype: Any = jnp.float32
  lowrank_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, dict[str, Any]]]:
    if self.rank < 0:
      raise ValueError(f"PixelflyLinear rank must be >= 0, got rank={self.rank}")
    in_features = x.shape[-1]
    mask_nn, (bk, bn) = pixelfly_blocks(in_features, self.features, self.block, self.levels)
    schedule = build_block_schedule(mask_nn)
    kept_fan_in = max(schedule.num_blocks * bk / mask_nn.shape[1], 1.0)
    # variance_scaling reads fan_in = bk off `[Z, bk, bn]`: scale bk / kept_fan_in.
    blocks_init = nn.initializers.variance_scaling(bk / kept_fan_in, "fan_in", "truncated_normal",
                                                   in_axis=-2, out_axis=-1, batch_axis=(0,))
    blocks_Zkn = self.param("blocks", blocks_init, (schedule.num_blocks, bk, bn), jnp.float32)
    x_MI = x.reshape(-1, in_features).astype(self.dtype)
    y_MO = block_sparse_matmul(x_MI, blocks_Zkn.astype(self.dtype), schedule,
                               implementation=self.implementation)
    if self.rank:
      u_IR = self.param("lowrank_u", self.lowrank_init, (in_features, self.rank), jnp.float32)
      v_RO = self.param("lowrank_v", nn.initializers.zeros_init(), (self.rank, self.features),
                        jnp.float32)
      y_MO = y_MO + jnp.dot(jnp.dot(x_MI, u_IR.astype(self.dtype)), v_RO.astype(self.dtype))
    if self.use_bias:
      y_MO = y_MO + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(
          self.dtype)
    density = jnp.asarray(schedule.density, jnp.float32)
    return y_MO.reshape(x.shape[:-1] + (self.features,)), {"losses": {}, "metrics": {
        "density": density}}
