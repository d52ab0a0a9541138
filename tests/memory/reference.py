"""Naive dense product-key memory: score all N = P^2 slots, top-k over N, dense weighted sum.

Independent of `sparsejax.memory.pkm`: no product-key candidate search and no gather; the N-wide
scores are formed from explicit concatenated keys, and the read is a dense (N-wide weights) x
values matmul. Differentiable with JAX, so gradients can be compared too.
"""
import jax
import jax.numpy as jnp
import numpy as np


def full_keys(keys_H2PA):
  """(H, N, Q) concatenated keys: key[h, i1 * P + i2] = [keys[h, 0, i1]; keys[h, 1, i2]]."""
  heads, _, num_keys, half = keys_H2PA.shape
  first_HPPA = jnp.broadcast_to(keys_H2PA[:, 0, :, None, :], (heads, num_keys, num_keys, half))
  second_HPPA = jnp.broadcast_to(keys_H2PA[:, 1, None, :, :], (heads, num_keys, num_keys, half))
  return jnp.concatenate([first_HPPA, second_HPPA], axis=-1).reshape(heads, num_keys**2, 2 * half)


def naive_scores(query_BHQ, keys_H2PA):
  """(B, H, N) float32 scores of every slot."""
  return jnp.einsum("bhq,hnq->bhn", query_BHQ.astype(jnp.float32), full_keys(keys_H2PA))


def naive_read(query_BHQ, keys_H2PA, values_ND, k):
  """(out_BD, idx_BHK, weights_BHK) by top-k over all N scores and a dense weighted sum."""
  scores_BHN = naive_scores(query_BHQ, keys_H2PA)
  top_BHK, idx_BHK = jax.lax.top_k(scores_BHN, k)
  weights_BHK = jax.nn.softmax(top_BHK, axis=-1)
  dense_BHN = jnp.einsum(
      "bhk,bhkn->bhn", weights_BHK, jax.nn.one_hot(idx_BHK, values_ND.shape[0])
  )
  return jnp.einsum("bhn,nd->bd", dense_BHN, values_ND), idx_BHK, weights_BHK


def np_brute_force_top_k(query_BHQ, keys_H2PA, k):
  """NumPy (scores_BHK descending, idx_BHK) over all N slots, in float64."""
  query = np.asarray(query_BHQ, np.float64)
  keys = np.asarray(keys_H2PA, np.float64)
  half = keys.shape[-1]
  s1_BHP = np.einsum("bha,hpa->bhp", query[..., :half], keys[:, 0])
  s2_BHP = np.einsum("bha,hpa->bhp", query[..., half:], keys[:, 1])
  scores_BHN = (s1_BHP[..., :, None] + s2_BHP[..., None, :]).reshape(*s1_BHP.shape[:2], -1)
  idx_BHK = np.argsort(-scores_BHN, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(scores_BHN, idx_BHK, axis=-1), idx_BHK, scores_BHN
