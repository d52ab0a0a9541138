"""Weighted sum of k gathered table rows per token, with a gradient that touches only those rows."""
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def gather_decode(table_ND: jax.Array, idx_TK: jax.Array, weights_TK: jax.Array) -> jax.Array:
  """out[t] = sum_k weights[t, k] * table[idx[t, k]]  (an embedding bag; [T, D]).

  Equals `dense_TN @ table_ND` for the [T, N] matrix holding `weights` at `idx`, at O(T K D)
  cost instead of O(T N D). Gradients: d weights[t, k] = <g[t], table[idx[t, k]]> and
  d table[n] = sum over (t, k) with idx[t, k] = n of weights[t, k] g[t] (a scatter-add). Indices
  must lie in [0, N); repeated indices in a row add up.
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (sparse TopK decoder kernel).
  """
  return _decode(table_ND, idx_TK, weights_TK)


def _decode(table_ND, idx_TK, weights_TK):
  rows_TKD = jnp.take(table_ND, idx_TK, axis=0)
  return jnp.einsum("tkd,tk->td", rows_TKD, weights_TK.astype(table_ND.dtype))


def _decode_fwd(table_ND, idx_TK, weights_TK):
  return _decode(table_ND, idx_TK, weights_TK), (table_ND, idx_TK, weights_TK)


def _decode_bwd(residuals, g_TD):
  table_ND, idx_TK, weights_TK = residuals
  rows_TKD = jnp.take(table_ND, idx_TK, axis=0)
  d_weights_TK = jnp.einsum("tkd,td->tk", rows_TKD, g_TD).astype(weights_TK.dtype)
  updates_TKD = weights_TK[..., None].astype(g_TD.dtype) * g_TD[:, None, :]
  d_table_ND = jnp.zeros_like(table_ND).at[idx_TK.reshape(-1)].add(
      updates_TKD.reshape(-1, table_ND.shape[1]).astype(table_ND.dtype))
  d_idx_TK = np.zeros(idx_TK.shape, jax.dtypes.float0)  # integer inputs take float0
  return d_table_ND, d_idx_TK, d_weights_TK


gather_decode.defvjp(_decode_fwd, _decode_bwd)
