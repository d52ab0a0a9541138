"""Monarch linear layer: two block-diagonal factors joined by reshape-transpose permutations.

With b blocks, I = b P inputs, O = b S outputs and a hidden width H = b Q (row-vector
convention, y_BO = x_BI W_IO):

  y = P_2 L P_1 R x,   R = diag(r_1 .. r_b), r_k [P, Q];   L = diag(l_1 .. l_b), l_k [Q, S]

  1. x_BI -> x_BbP (block k holds inputs kP .. kP + P - 1);   h_BbQ = einsum(x_BbP, r_bPQ)
  2. P_1, the stride permutation: flat hidden position f = kQ + j goes to block f mod b, slot
     f // b, i.e. h_BbQ reshaped to [B, Q, b] and transposed to g_BbQ
  3. z_BbS = einsum(g_BbQ, l_bQS)
  4. P_2: output o = s b + k reads z[k, s], i.e. z transposed to [B, S, b] and flattened

Two batched matmuls, O(B H (I + O) / b) FLOPs against B I O for a dense layer; the dense
matrix is never built (`monarch_dense` builds it, for tests and export). In the square case
I = O = H = b^2 (P = Q = S = b) every entry of W is a single product,
W[(k, a), (s, c)] = r_k[a, c] l_c[k, s] (input kb + a, output sb + c), so W reshaped to
[b, b, b, b] is rank one in each (k, c) slice. Dao et al. 2022, "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training" (M = P L P^T R); Fu et al. 2023, "Monarch Mixer".

Init: every block LeCun normal over its fan-in (P for R, Q for L), so y has the variance of x,
as for a LeCun-initialised dense layer.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_blocks(in_features: int, l_bQS: jax.Array, r_bPQ: jax.Array) -> None:
  if l_bQS.ndim != 3 or r_bPQ.ndim != 3:
    raise ValueError(f"monarch blocks must be [b, P, Q] and [b, Q, S], got r_blocks "
                     f"{r_bPQ.shape} and l_blocks {l_bQS.shape}")
  nblocks, block_in, hidden = r_bPQ.shape
  if l_bQS.shape[:2] != (nblocks, hidden):
    raise ValueError(f"monarch l_blocks must be [b={nblocks}, Q={hidden}, S] to follow r_blocks "
                     f"{r_bPQ.shape}, got {l_bQS.shape}")
  if in_features != nblocks * block_in:
    raise ValueError(f"monarch input width must be b * P = {nblocks * block_in} (r_blocks "
                     f"{r_bPQ.shape}), got {in_features}")


def monarch_matmul(x: jax.Array, l_blocks: jax.Array, r_blocks: jax.Array) -> jax.Array:
  """y [..., b S] = P_2 L P_1 R x for x [..., b P], r_blocks [b, P, Q], l_blocks [b, Q, S]
  (module docstring), as two batched matmuls; Dao et al. 2022, "Monarch"."""
  _check_blocks(x.shape[-1], l_blocks, r_blocks)
  nblocks, block_in, block_hidden = r_blocks.shape
  block_out = l_blocks.shape[2]
  lead = x.shape[:-1]
  batch_dims = (((2,), (1,)), ((0,), (0,)))  # contract the block's input, batch over blocks
  # Block-major [b, B, .] operands: no layout copies inside the matmuls (1.3x faster fwd+bwd on
  # CPU than einsum on [B, b, .]).
  x_bBP = x.reshape(-1, nblocks, block_in).transpose(1, 0, 2)
  h_bBQ = jax.lax.dot_general(x_bBP, r_blocks, batch_dims)
  g_bBQ = h_bBQ.transpose(1, 0, 2).reshape(-1, block_hidden, nblocks).transpose(2, 0, 1)
  z_bBS = jax.lax.dot_general(g_bBQ, l_blocks, batch_dims)
  return z_bBS.transpose(1, 2, 0).reshape(*lead, block_out * nblocks)


def monarch_dense(l_blocks: jax.Array, r_blocks: jax.Array) -> jax.Array:
  """W_IO [b P, b S] with x W == monarch_matmul(x, l_blocks, r_blocks) (for tests / export)."""
  nblocks, block_in, _ = r_blocks.shape
  eye_II = jnp.eye(nblocks * block_in, dtype=r_blocks.dtype)
  return monarch_matmul(eye_II, l_blocks, r_blocks)


def monarch_shapes(in_features: int, features: int, nblocks: int,
                   hidden: int | None = None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(r_blocks shape [b, P, Q], l_blocks shape [b, Q, S]) of an I -> O Monarch map with b blocks
  and hidden width H = b Q (default H = O); every width must be a multiple of b."""
  hidden = features if hidden is None else hidden
  if nblocks < 1:
    raise ValueError(f"monarch nblocks must be >= 1, got nblocks={nblocks}")
  for name, width in (("in_features", in_features), ("features", features), ("hidden", hidden)):
    if width < 1 or width % nblocks:
      raise ValueError(f"monarch {name}={width} must be a positive multiple of "
                       f"nblocks={nblocks}")
  return ((nblocks, in_features // nblocks, hidden // nblocks),
          (nblocks, hidden // nblocks, features // nblocks))


class MonarchLinear(nn.Module):
  """y = P_2 L P_1 R x + b (module docstring). Returns `(y [..., O], aux)` with aux =
  {"losses": {}, "metrics": {"param_fraction": Monarch params / dense I O}}.

  Attributes:
    features: O, a multiple of `nblocks`.
    nblocks: b, the number of blocks of each factor (I must be a multiple too).
    hidden: H, the width between the factors (None: O), a multiple of b.
    use_bias: add a bias `[O]`.
    kernel_axes: logical names of the input and output axes, as for a dense `[I, O]` kernel;
      r_blocks `[b, P, Q]` is annotated (None, input, None), l_blocks `[b, Q, S]`
      (None, None, output), the bias (output,).
  """
  features: int
  nblocks: int
  hidden: int | None = None
  use_bias: bool = True
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
  dtype: Any = jnp.float32
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, dict[str, Any]]]:
    in_features = x.shape[-1]
    r_shape, l_shape = monarch_shapes(in_features, self.features, self.nblocks, self.hidden)
    axis_in, axis_out = self.kernel_axes
    block_init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
    r_bPQ = self.param("r_blocks", nn.with_logical_partitioning(
        block_init, (None, axis_in, None)), r_shape, jnp.float32)
    l_bQS = self.param("l_blocks", nn.with_logical_partitioning(
        block_init, (None, None, axis_out)), l_shape, jnp.float32)
    y = monarch_matmul(x.astype(self.dtype), l_bQS.astype(self.dtype), r_bPQ.astype(self.dtype))
    if self.use_bias:
      bias_O = self.param("bias", nn.with_logical_partitioning(self.bias_init, (axis_out,)),
                          (self.features,), jnp.float32)
      y = y + bias_O.astype(self.dtype)
    fraction = (r_bPQ.size + l_bQS.size) / (in_features * self.features)
    return y, {"losses": {}, "metrics": {"param_fraction": jnp.asarray(fraction, jnp.float32)}}
