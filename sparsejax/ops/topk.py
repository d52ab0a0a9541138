"""Top-k of ReLU(x W + b) per token, with a backward pass that touches only the k chosen columns.

The forward matmul stays dense (every score is needed to rank them); everything after it, and
the whole backward pass, costs O(T K D) instead of O(T N D). The forward runs over chunks of
tokens so that one chunk's [C, N] scores stay in cache while they are ranked, and never exist
all at once.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.ops.gather import chunk_tokens, gather_rows_sum, scatter_rows_add

# Entries per row block in `top_k_blocked`: ~sqrt(N / k) balances its two top-k passes.
_BLOCK = 16
# `topk_encode` scores about this many [C, N] entries at a time (8 MiB in float32).
_CHUNK_ENTRIES = 2**21


def top_k_blocked(scores_TN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k largest entries of each row and their columns, exactly, in descending order.

  With blocks of B columns and m_Tg = max over block g: the top-k entries lie in the k blocks of
  largest m (any block holding one has m >= the k-th value, and at most k blocks do), so
  top_k(scores) = top_k over those k B candidates. Both passes run `lax.top_k` on rows whose
  first k entries are group maxima (see `_seeded_top_k`): CPU XLA's top-k is a heap over the row
  that rarely has to update when its first k entries are already large (N = 8192, k = 32: ~2.2x
  faster than `lax.top_k` on a 2-core x86 CPU). Which of several equal entries is returned is
  unspecified. Falls back to `lax.top_k` when B does not divide N or there are fewer than 4 k
  blocks.
  Chern et al. 2022, "TPU-KNN" (top-k over bucket maxima), made exact by the block-max bound.
  """
  if scores_TN.ndim != 2:
    raise ValueError(f"scores_TN must be [T, N]; got shape {scores_TN.shape}")
  num_tokens, num_cols = scores_TN.shape
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_cols:
    raise ValueError(f"k={k!r} must be an int in [1, {num_cols}] (the row length)")
  num_blocks = num_cols // _BLOCK
  if num_cols % _BLOCK or num_blocks < 4 * k:
    return jax.lax.top_k(scores_TN, k)
  scores_TGB = scores_TN.reshape(num_tokens, num_blocks, _BLOCK)
  _, blocks_TK = _seeded_top_k(scores_TGB.max(axis=-1), k)
  rows_TK = blocks_TK + num_blocks * jnp.arange(num_tokens, dtype=blocks_TK.dtype)[:, None]
  candidates_TKB = jnp.take(scores_TGB.reshape(-1, _BLOCK), rows_TK, axis=0, mode="clip")
  vals_TK, flat_TK = _seeded_top_k(candidates_TKB.reshape(num_tokens, k * _BLOCK), k)
  block_TK = jnp.take_along_axis(blocks_TK, flat_TK // _BLOCK, axis=1)
  return vals_TK, block_TK * _BLOCK + flat_TK % _BLOCK


def _seeded_top_k(scores_Tn: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k of each row, run on a permutation whose first k entries are k group maxima.

  Row t is cut into k groups of S = n / k; each group's max is swapped with its first entry and
  the row is read slot-major ([T, k, S] -> [T, S, k]), so the k group maxima come first. Falls
  back to `lax.top_k` when k does not divide n.
  """
  num_tokens, n = scores_Tn.shape
  if n % k:
    return jax.lax.top_k(scores_Tn, k)
  size = n // k
  scores_TkS = scores_Tn.reshape(num_tokens, k, size)
  argmax_Tk = jnp.argmax(scores_TkS, axis=-1)
  slot_S = jnp.arange(size)
  swapped_TkS = jnp.where(
      slot_S == 0, scores_TkS.max(axis=-1, keepdims=True),
      jnp.where(slot_S == argmax_Tk[..., None], scores_TkS[..., :1], scores_TkS))
  vals_TK, flat_TK = jax.lax.top_k(swapped_TkS.transpose(0, 2, 1).reshape(num_tokens, n), k)
  group_TK, slot_TK = flat_TK % k, flat_TK // k
  argmax_TK = jnp.take_along_axis(argmax_Tk, group_TK, axis=1)
  slot_TK = jnp.where(slot_TK == 0, argmax_TK, jnp.where(slot_TK == argmax_TK, 0, slot_TK))
  return vals_TK, group_TK * size + slot_TK


def topk_encode(x_TD: jax.Array, w_DN: jax.Array, b_N: jax.Array, k: int, *,
                approx: bool = False) -> tuple[jax.Array, jax.Array]:
  """(vals_TK, idx_TK): the k largest entries of ReLU(x W + b) per token and their latents.

  pre_TN = x W + b; idx = the k largest pre per token (descending); vals = ReLU(pre[idx]) (the
  top-k of ReLU(pre), since ReLU is monotone; which of several zero entries are returned is
  unspecified). Gradients, with g_TK masked to vals > 0: d W[:, idx[t, k]] += x[t] g[t, k],
  d b[idx[t, k]] += g[t, k], d x[t] = sum_k g[t, k] W[:, idx[t, k]], all O(T K D).
  `approx=True` ranks with `lax.approx_max_k` (recall ~0.95; fast on TPU, exact elsewhere).
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (TopK SAE and its sparse kernels).
  """
  if x_TD.ndim != 2 or w_DN.ndim != 2 or x_TD.shape[1] != w_DN.shape[0]:
    raise ValueError(f"x_TD {x_TD.shape} and w_DN {w_DN.shape} must be [T, D] and [D, N]")
  if b_N.shape != (w_DN.shape[1],):
    raise ValueError(f"b_N shape {b_N.shape} must be ({w_DN.shape[1]},), one bias per latent")
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= w_DN.shape[1]:
    raise ValueError(f"k={k!r} must be an int in [1, {w_DN.shape[1]}] (the number of latents)")
  return _topk_encode(x_TD, w_DN, b_N, int(k), bool(approx))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _topk_encode(x_TD, w_DN, b_N, k, approx):
  return _rank_in_chunks(x_TD, w_DN, b_N, k, approx)


def _rank_in_chunks(x_TD, w_DN, b_N, k, approx):
  """vals and idx of topk_encode, scoring C tokens at a time (the last chunk zero-padded)."""
  (x_GCD,) = chunk_tokens((x_TD,), w_DN.shape[1], _CHUNK_ENTRIES)
  rank = (functools.partial(jax.lax.approx_max_k, k=k) if approx
          else functools.partial(top_k_blocked, k=k))

  def rank_chunk(x_CD):
    vals_CK, idx_CK = rank(x_CD @ w_DN + b_N)
    return jax.nn.relu(vals_CK), idx_CK.astype(jnp.int32)

  vals_GCK, idx_GCK = jax.lax.map(rank_chunk, x_GCD)
  num_tokens = x_TD.shape[0]
  return vals_GCK.reshape(-1, k)[:num_tokens], idx_GCK.reshape(-1, k)[:num_tokens]


def _topk_encode_fwd(x_TD, w_DN, b_N, k, approx):
  vals_TK, idx_TK = _rank_in_chunks(x_TD, w_DN, b_N, k, approx)
  return (vals_TK, idx_TK), (x_TD, w_DN, b_N, vals_TK, idx_TK)


def _topk_encode_bwd(k, approx, residuals, cotangents):
  del k, approx  # static; the residuals hold what the backward needs
  x_TD, w_DN, b_N, vals_TK, idx_TK = residuals
  g_TK = jnp.where(vals_TK > 0, cotangents[0], 0).astype(x_TD.dtype)
  num_latents = w_DN.shape[1]
  d_x_TD = gather_rows_sum(w_DN.T, idx_TK, g_TK)
  d_w_DN = scatter_rows_add(idx_TK, g_TK, x_TD, num_latents).T
  d_b_N = jnp.zeros(num_latents, g_TK.dtype).at[idx_TK.reshape(-1)].add(g_TK.reshape(-1))
  return d_x_TD, d_w_DN.astype(w_DN.dtype), d_b_N.astype(b_N.dtype)


_topk_encode.defvjp(_topk_encode_fwd, _topk_encode_bwd)
