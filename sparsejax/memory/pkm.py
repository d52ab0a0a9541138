"""Product-key memory as pure functions: product-key top-k lookup and embedding-bag reads.

A memory of N = P^2 slots addresses slot i1 * P + i2 with the concatenated key [c1_i1; c2_i2]
built from two sub-key tables c1, c2 of P keys each. Splitting a query q = [q1; q2] gives
score(i1, i2) = <q1, c1_i1> + <q2, c2_i2>, so the exact top-k over all N slots lies among the
sums of the top-k of each half: the lookup costs O(P Q + k log^2 k) per query instead of the
O(N Q) of scoring every slot. The read is an embedding bag: gather the k selected value rows
and sum them weighted by the softmax of their scores, so no N-wide array is ever formed and
the value-table gradient is non-zero only on the gathered rows.

Shape letters beyond the DESIGN legend: Q is the query (and full key) dim, A = Q / 2 the dim of
each half; P = sqrt(N) the sub-keys per half; D the value dim; R the candidate rank pairs.

Lample et al. 2019, "Large Memory Layers with Product Keys".
"""
import math

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np


def num_subkeys(memory_size: int) -> int:
  """P = sqrt(N) for a memory of N = P^2 slots; ValueError when N is not a perfect square."""
  if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
    raise ValueError(f"memory_size must be a positive int, got {memory_size!r}")
  root = math.isqrt(memory_size)
  if root * root != memory_size:
    raise ValueError(
        f"memory_size={memory_size} is not a perfect square; product keys address N = P^2 "
        f"slots, e.g. {root * root} or {(root + 1) ** 2}"
    )
  return root


def check_top_k(k: int, num_keys: int) -> None:
  """ValueError unless 1 <= k <= num_keys (P, the sub-keys per product half)."""
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_keys:
    raise ValueError(
        f"k must be an int in [1, num_keys={num_keys}] (top-k is taken over each half's "
        f"{num_keys} sub-keys), got {k!r}"
    )


def _check_lookup_shapes(query_BHQ: jax.Array, keys_H2PA: jax.Array) -> None:
  """ValueError unless query is (..., H, 2A) and keys is (H, 2, P, A)."""
  if keys_H2PA.ndim != 4 or keys_H2PA.shape[1] != 2:
    raise ValueError(f"keys must have shape (H, 2, P, A), got {keys_H2PA.shape}")
  heads, _, _, half = keys_H2PA.shape
  if query_BHQ.ndim < 2 or query_BHQ.shape[-2:] != (heads, 2 * half):
    raise ValueError(
        f"query must have shape (..., H={heads}, Q={2 * half}) to match keys {keys_H2PA.shape}, "
        f"got {query_BHQ.shape}"
    )


def half_scores(query_BHQ: jax.Array, keys_H2PA: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scores of each query half against its sub-key table, in float32.

  s1_bhp = <q_bh[:A], c1_hp>, s2_bhp = <q_bh[A:], c2_hp>; O(P Q) per query and head.
  """
  _check_lookup_shapes(query_BHQ, keys_H2PA)
  q1_BHA, q2_BHA = jnp.split(query_BHQ.astype(jnp.float32), 2, axis=-1)
  keys_H2PA = keys_H2PA.astype(jnp.float32)
  s1_BHP = jnp.einsum("...ha,hpa->...hp", q1_BHA, keys_H2PA[:, 0])
  s2_BHP = jnp.einsum("...ha,hpa->...hp", q2_BHA, keys_H2PA[:, 1])
  return s1_BHP, s2_BHP


def candidate_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
  """Rank pairs (a, b), 0-based, with (a + 1)(b + 1) <= k: the only ones that can make a top-k.

  With t1, t2 sorted descending, the (a + 1)(b + 1) pairs (a' <= a, b' <= b) all score
  t1_a' + t2_b' >= t1_a + t2_b, so a pair with (a + 1)(b + 1) > k is beaten or tied by k others.
  There are sum_a floor(k / a) ~ k ln k such pairs instead of k^2 (50 for k = 16, 119 for 32).
  """
  first, second = zip(*[(a, b) for a in range(k) for b in range(k // (a + 1))])
  return np.array(first), np.array(second)


def pkm_lookup(query_BHQ: jax.Array, keys_H2PA: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Exact top-k slots of N = P^2 product keys, per query and head, without scoring all N.

  (t1, i1) = top_k(s1, k), (t2, i2) = top_k(s2, k) with s1, s2 from `half_scores`; then
  (scores, j) = top_k over the candidate sums t1_a + t2_b, and idx = i1_a * P + i2_b for the
  chosen pair (a, b). The top-k of s1_i + s2_j over all (i, j) is among the k^2 sums (a pair
  outside both halves' top-k is beaten by k pairs inside), and among those only the ~k ln k
  pairs of `candidate_pairs` can win. Cost O(P Q + k log^2 k) per query and head. Leading batch
  dims of `query` are arbitrary; scores are float32 in descending order. Among exactly tied
  slots the choice may differ from a sort over all N.
  Lample et al. 2019, "Large Memory Layers with Product Keys", section 3.2.

  Args:
    query_BHQ: (..., H, Q) queries; Q = 2A.
    keys_H2PA: (H, 2, P, A) sub-keys: keys[h, 0] for the first query half, keys[h, 1] for the
      second.
    k: slots per query and head, 1 <= k <= P.

  Returns:
    (scores_BHK float32, idx_BHK int32 in [0, P^2)).
  """
  _check_lookup_shapes(query_BHQ, keys_H2PA)
  num_keys = keys_H2PA.shape[2]
  check_top_k(k, num_keys)
  s1_BHP, s2_BHP = half_scores(query_BHQ, keys_H2PA)
  t1_BHK, i1_BHK = jax.lax.top_k(s1_BHP, k)
  t2_BHK, i2_BHK = jax.lax.top_k(s2_BHP, k)
  first_R, second_R = candidate_pairs(k)
  candidates_BHR = t1_BHK[..., first_R] + t2_BHK[..., second_R]
  scores_BHK, pair_BHK = jax.lax.top_k(candidates_BHR, k)
  slot1_BHK = jnp.take_along_axis(i1_BHK, jnp.asarray(first_R)[pair_BHK], axis=-1)
  slot2_BHK = jnp.take_along_axis(i2_BHK, jnp.asarray(second_R)[pair_BHK], axis=-1)
  return scores_BHK, (slot1_BHK * num_keys + slot2_BHK).astype(jnp.int32)


def embedding_bag(values_ND: jax.Array, idx_BK: jax.Array, weights_BK: jax.Array,
                  rows_delta_BKD: jax.Array | None = None) -> jax.Array:
  """Weighted sum of gathered value rows: out_b = sum_k w_bk (V[idx_bk] + delta_bk).

  Gathers only the B x K selected rows (never an N-wide array); the gradient w.r.t. V is a
  scatter-add of w_bk * dout_b into rows idx_bk, zero elsewhere. `rows_delta` (same shape as the
  gathered rows, default none) is added to them: pass zeros and differentiate w.r.t. it to get
  the gradient of each gathered row, i.e. V's gradient as (idx, rows) without an N x D buffer.
  Leading dims of idx / weights are arbitrary; indices must lie in [0, N) (they are clipped).
  Computed in `values`' dtype.
  Lample et al. 2019, "Large Memory Layers with Product Keys" (the EmbeddingBag read).
  """
  if values_ND.ndim != 2:
    raise ValueError(f"values must have shape (N, D), got {values_ND.shape}")
  if idx_BK.shape != weights_BK.shape:
    raise ValueError(
        f"idx and weights must have the same shape, got {idx_BK.shape} and {weights_BK.shape}"
    )
  rows_BKD = jnp.take(values_ND, idx_BK, axis=0, mode="clip")
  if rows_delta_BKD is not None:
    if rows_delta_BKD.shape != rows_BKD.shape:
      raise ValueError(
          f"rows_delta must have the gathered rows' shape {rows_BKD.shape}, got "
          f"{rows_delta_BKD.shape}"
      )
    rows_BKD = rows_BKD + rows_delta_BKD.astype(rows_BKD.dtype)
  return jnp.einsum("...k,...kd->...d", weights_BK.astype(values_ND.dtype), rows_BKD)


def pkm_read(
    query_BHQ: jax.Array, keys_H2PA: jax.Array, values_ND: jax.Array, k: int,
    rows_delta_BRD: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Multi-head product-key memory read: m(q) = sum_h sum_k softmax(scores_h)_k V[idx_hk].

  Each head h looks up its own top-k slots with `pkm_lookup`; its weights are the softmax of
  its k scores (float32); all heads read the same value table and their outputs are summed.
  `rows_delta_BRD` ((..., H k, D), heads-major) is added to the gathered rows, as in
  `embedding_bag`.
  Lample et al. 2019, "Large Memory Layers with Product Keys", sections 3.2-3.3.

  Returns:
    (out_BD in values' dtype, idx_BHK, weights_BHK float32).
  """
  _check_lookup_shapes(query_BHQ, keys_H2PA)
  num_keys = keys_H2PA.shape[2]
  if values_ND.ndim != 2:
    raise ValueError(f"values must have shape (N, D), got {values_ND.shape}")
  if values_ND.shape[0] != num_keys**2:
    raise ValueError(
        f"values has N={values_ND.shape[0]} rows but keys {keys_H2PA.shape} address "
        f"P^2={num_keys**2} slots; N must be the square of the sub-keys per half"
    )
  scores_BHK, idx_BHK = pkm_lookup(query_BHQ, keys_H2PA, k)
  weights_BHK = jax.nn.softmax(scores_BHK, axis=-1)
  flat_shape = idx_BHK.shape[:-2] + (idx_BHK.shape[-2] * k,)
  out_BD = embedding_bag(values_ND, idx_BHK.reshape(flat_shape), weights_BHK.reshape(flat_shape),
                         rows_delta_BRD)
  return out_BD, idx_BHK, weights_BHK


def slot_histograms(
    idx_BHK: jax.Array, weights_BHK: jax.Array, memory_size: int
) -> tuple[jax.Array, jax.Array]:
  """(c_N, m_N): how many reads each slot got, and the softmax weight mass it got (float32).

  c_n = |{(b, h, k) : idx_bhk = n}|, m_n = sum of weights_bhk over those reads; no gradient.
  Histograms of several batches add up, so a whole eval window is the sum of its batches'.
  """
  idx = jax.lax.stop_gradient(idx_BHK).reshape(-1)
  weights = jax.lax.stop_gradient(weights_BHK).astype(jnp.float32).reshape(-1)
  counts_N = jnp.zeros((memory_size,), jnp.float32).at[idx].add(1.0)
  mass_N = jnp.zeros((memory_size,), jnp.float32).at[idx].add(weights)
  return counts_N, mass_N


def histogram_stats(counts_N: jax.Array, mass_N: jax.Array, top: int = 0) -> dict[str, jax.Array]:
  """usage, normalised access entropy, top slot share (and, with `top` > 0, the top slots).

  With p_n = m_n / sum_m m_m:
    usage          = |{n : c_n > 0}| / N            (Lample et al.'s "memory usage")
    access_entropy = -sum_n p_n log p_n / log N      (1 = every slot read equally)
    top_slot_share = max_n p_n
    top_slots      = the `top` slots of largest p_n, descending (int32), only when top > 0.
  """
  memory_size = counts_N.shape[-1]
  p_N = mass_N / jnp.maximum(jnp.sum(mass_N), 1e-30)
  entropy = jnp.sum(jax.scipy.special.entr(p_N))
  stats = {
      "memory_usage": jnp.mean(counts_N > 0).astype(jnp.float32),
      "access_entropy": entropy / math.log(memory_size) if memory_size > 1 else entropy,
      "top_slot_share": jnp.max(p_N),
  }
  if top > 0:
    stats["top_slots"] = jax.lax.top_k(p_N, min(top, memory_size))[1].astype(jnp.int32)
  return stats


def access_stats(
    idx_BHK: jax.Array, weights_BHK: jax.Array, memory_size: int
) -> dict[str, jax.Array]:
  """Telemetry of which slots a batch read: `histogram_stats` of the batch's reads, in O(R log R).

  Keys memory_usage, access_entropy, top_slot_share: float32 scalars, without gradient. Equal to
  `histogram_stats(*slot_histograms(...))`, but computed over the R = B H K reads only: sorted by
  slot, each distinct slot's weight mass is a segment sum, and slots never read (zero mass) add
  nothing to any of the three; so a train step's telemetry costs no O(N) buffer.
  """
  idx_R = jax.lax.stop_gradient(idx_BHK).reshape(-1)
  weights_R = jax.lax.stop_gradient(weights_BHK).astype(jnp.float32).reshape(-1)
  order_R = jnp.argsort(idx_R)
  idx_R, weights_R = idx_R[order_R], weights_R[order_R]
  first_R = jnp.concatenate([jnp.ones((1,), bool), idx_R[1:] != idx_R[:-1]])
  segment_R = jnp.cumsum(first_R) - 1
  mass_R = jnp.zeros_like(weights_R).at[segment_R].add(weights_R)
  p_R = mass_R / jnp.maximum(jnp.sum(mass_R), 1e-30)
  entropy = jnp.sum(jax.scipy.special.entr(p_R))
  return {
      "memory_usage": (jnp.sum(first_R) / memory_size).astype(jnp.float32),
      "access_entropy": entropy / math.log(memory_size) if memory_size > 1 else entropy,
      "top_slot_share": jnp.max(p_R),
  }
