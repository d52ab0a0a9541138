"""Top-k binarised ultra-wide embeddings: project to N >> D units, keep the k largest as ones.

code = 1[top-k of s], s = x W + b (W: D x N), with the straight-through gradient dcode/ds = I.
Codes are compared by their overlap |A ∩ B| = <code_a, code_b>, computed from the k indices of
each code (O(k^2) compares, no N-wide vectors), so inference keeps only k int32 per item.
Shape letters: N the code width, K = k the ones per code.
Dasgupta, Stevens & Navlakha 2017, "A neural algorithm for a fundamental computing problem" (fly
hashing: expansion to many units, winner-take-all binarisation); Bengio, Léonard & Courville 2013
(straight-through gradient).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.coding.bottleneck import check_k, indices_to_mask
from sparsejax.models.layers import logical_param
from sparsejax.ops import topk_encode


def _check_shapes(x_BD: jax.Array, w_DN: jax.Array, b_N: jax.Array) -> None:
  if w_DN.ndim != 2 or x_BD.shape[-1] != w_DN.shape[0] or b_N.shape != w_DN.shape[1:]:
    raise ValueError(f"x_BD {x_BD.shape}, w_DN {w_DN.shape} and b_N {b_N.shape} must be "
                     "[..., D], [D, N] and [N]")


def binary_code(x_BD: jax.Array, w_DN: jax.Array, b_N: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array]:
  """(code_BN, idx_BK): code = 1 at the k largest s = x W + b, 0 elsewhere; idx those k units.

  Straight-through: code = m + s - stop_gradient(s), so dL/ds = dL/dcode (dL/dW = x^T dL/dcode,
  dL/db = sum over rows of dL/dcode). idx is in descending order of s.
  """
  _check_shapes(x_BD, w_DN, b_N)
  check_k(k, w_DN.shape[1])
  scores_BN = x_BD @ w_DN + b_N
  _, idx_BK = jax.lax.top_k(scores_BN, k)
  mask_BN = indices_to_mask(idx_BK, w_DN.shape[1], scores_BN.dtype)
  return mask_BN + (scores_BN - jax.lax.stop_gradient(scores_BN)), idx_BK  # exactly 0 / 1


def code_indices(x_BD: jax.Array, w_DN: jax.Array, b_N: jax.Array, k: int) -> jax.Array:
  """idx_BK (int32): the k units of binary_code's code, ranked by `sparsejax.ops.topk_encode`.

  The fast inference path: scores are ranked chunk by chunk and no N-wide code is built.
  """
  _check_shapes(x_BD, w_DN, b_N)
  check_k(k, w_DN.shape[1])
  _, idx_TK = topk_encode(x_BD.reshape(-1, x_BD.shape[-1]), w_DN, b_N, k)
  return idx_TK.reshape(x_BD.shape[:-1] + (k,))


def code_overlap(idx_a_BK: jax.Array, idx_b_BK: jax.Array) -> jax.Array:
  """|A ∩ B| for codes given by their indices: sum_{i, j} [a_i = b_j] (int32, [...]).

  Equals <code_a, code_b> of the dense binary codes when each row's indices are distinct (as
  top-k's are). Leading dims broadcast: `code_overlap(idx_QK[:, None], idx_MK[None])` scores
  every query against every stored code, [Q, M].
  """
  if idx_a_BK.shape[-1] != idx_b_BK.shape[-1]:
    raise ValueError(f"idx_a_BK {idx_a_BK.shape} and idx_b_BK {idx_b_BK.shape} must have the "
                     "same k (last axis)")
  same_BKK = idx_a_BK[..., :, None] == idx_b_BK[..., None, :]
  return jnp.sum(same_BKK, axis=(-2, -1), dtype=jnp.int32)


def code_metrics(idx_BK: jax.Array, num_features: int) -> dict[str, jax.Array]:
  """{"active_fraction": units on in some row, "max_feature_rate": the busiest unit's on-rate}."""
  counts_N = jnp.zeros(num_features, jnp.float32).at[idx_BK.reshape(-1)].add(1.0)
  num_rows = idx_BK.size // idx_BK.shape[-1]
  return {"active_fraction": jnp.mean((counts_N > 0).astype(jnp.float32)),
          "max_feature_rate": jnp.max(counts_N) / num_rows}


class BinarisedEmbedding(nn.Module):
  """A k-hot code in N = `num_features` units: `binary_code` (training) or `code_indices`.

  Params "w" [D, N] ("embed", "latent"; lecun normal) and "b" [N] ("latent"; zeros).
  Call: `(x_BD, *, sparse=False, deterministic=True) -> (code_BN, aux)` with the straight-through
  code, or with `sparse=True` `(idx_BK, aux)`, the k int32 indices (compare them with
  `code_overlap`). aux metrics "active_fraction" and "max_feature_rate" (`code_metrics`).
  """

  num_features: int
  k: int

  @nn.compact
  def __call__(self, x_BD: jax.Array, *, sparse: bool = False,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No randomness.
    check_k(self.k, self.num_features)
    w_DN = logical_param(self, "w", nn.initializers.lecun_normal(),
                         (x_BD.shape[-1], self.num_features), ("embed", "latent"), x_BD.dtype)
    b_N = logical_param(self, "b", nn.initializers.zeros_init(), (self.num_features,),
                        ("latent",), x_BD.dtype)
    if sparse:
      out = idx_BK = code_indices(x_BD, w_DN, b_N, self.k)
    else:
      out, idx_BK = binary_code(x_BD, w_DN, b_N, self.k)
    return out, {"losses": {}, "metrics": code_metrics(idx_BK, self.num_features)}
