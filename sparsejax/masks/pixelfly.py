"""Pixelated Butterfly linear layer: a fixed flat block butterfly kernel plus a low-rank term.

  y_BO = x_BI (M_IO ⊙ W_IO) + (x_BI U_IR) V_RO + b_O

M is the fixed flat block butterfly pattern `structures.pattern("butterfly", (I, O),
block=block, levels=levels)` (block (r, c) kept iff r ^ c is 0 or a power of two below
2^levels; all log2 levels by default), a NumPy constant, not a parameter; masked entries of W
never reach the output and get exactly zero gradient. U `[I, R]`, V `[R, O]` are dense (R =
`rank`; 0 drops the term). Dao et al. 2022, "Pixelated Butterfly: Simple and Efficient Sparse
Training for Neural Network Models" (flat block butterfly + low rank).

Init: W truncated normal with variance 1 / (kept inputs per output, averaged over outputs), so
the sparse term has the variance of a dense LeCun-initialised layer; U LeCun normal over I; V
zeros, so at init y equals the sparse term (the low-rank term starts at zero, as in LoRA).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.masks import structures


def pixelfly_pattern(in_features: int, features: int, block: Any = 1,
                     levels: int | None = None) -> np.ndarray:
  """M_IO: the flat block butterfly pattern of an `[I, O]` kernel (clear error if the block grid
  is not a power of two dividing the larger side, see `structures`)."""
  return np.asarray(structures.pattern("butterfly", (in_features, features), None, block=block,
                                       levels=levels), bool)


class PixelflyLinear(nn.Module):
  """y = x (M ⊙ W) + (x U) V + b, see the module docstring. Returns `(y [..., O], aux)` with
  aux = {"losses": {}, "metrics": {"density": kept fraction of M}}.

  Attributes:
    features: O.
    block: butterfly block size, an int b (b x b) or (bk, bn); it must tile `[I, O]`.
    rank: R, the rank of the dense low-rank term (0: butterfly only).
    levels: butterfly levels (None: all, log2 of the smaller block-grid side).
    use_bias: add a bias `[O]`.
  """
  features: int
  block: Any = 1
  rank: int = 0
  levels: int | None = None
  use_bias: bool = True
  dtype: Any = jnp.float32
  lowrank_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, dict[str, Any]]]:
    if self.rank < 0:
      raise ValueError(f"PixelflyLinear rank must be >= 0, got rank={self.rank}")
    in_features = x.shape[-1]
    mask_IO = pixelfly_pattern(in_features, self.features, self.block, self.levels)
    kept_fan_in = max(float(mask_IO.sum()) / self.features, 1.0)
    kernel_init = nn.initializers.variance_scaling(in_features / kept_fan_in, "fan_in",
                                                   "truncated_normal")
    w_IO = self.param("kernel", kernel_init, (in_features, self.features), jnp.float32)
    sparse_w_IO = jnp.where(mask_IO, w_IO, jnp.zeros((), w_IO.dtype)).astype(self.dtype)
    x = x.astype(self.dtype)
    y = jnp.dot(x, sparse_w_IO)
    if self.rank:
      u_IR = self.param("lowrank_u", self.lowrank_init, (in_features, self.rank), jnp.float32)
      v_RO = self.param("lowrank_v", nn.initializers.zeros_init(), (self.rank, self.features),
                        jnp.float32)
      y = y + jnp.dot(jnp.dot(x, u_IR.astype(self.dtype)), v_RO.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    density = jnp.asarray(mask_IO.mean(), jnp.float32)
    return y, {"losses": {}, "metrics": {"density": density}}
