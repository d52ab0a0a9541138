"""Routing Transformer attention: online spherical k-means routes queries and keys to clusters.

Each head keeps C centroids (explicit state, collection "kmeans", updated in training steps by
an exponential moving average of the queries and keys assigned to them). A query attends, under
the causal mask, to the keys of its own local window and to the keys routed to the same cluster.
Clusters are balanced with static shapes: cluster c keeps the w members (queries and keys apart)
nearest its centroid, so the routed part costs C w^2 = T^2 / C per head for w = T / C; members
past the w nearest fall back to the local window alone.

Shape letters beyond the DESIGN legend: K the per-head dim, C clusters, W tokens per cluster
window (w), N vectors per head (any flattened leading positions), S key positions (the T tokens
seen as keys), R local-window blocks.
"""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.models.layers import check_attention_fields, project_out, project_qkv
from sparsejax.registry import ATTENTIONS
from sparsejax.sites import Site

KMEANS = "kmeans"  # the variable collection holding each routing layer's "centroids" [H, C, K]
_EPS = 1e-6


def unit_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-6) over the last axis."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def centroid_distances(x_HNK: jax.Array, centroids_HCK: jax.Array) -> jax.Array:
  """Squared distances ||x^_n - mu_c||^2 = 1 - 2 <x^_n, mu_c> + ||mu_c||^2 `[..., H, N, C]` of
  the unit-normalised x^ (any leading axes before H) to every centroid of its head."""
  x_HNK = unit_normalize(x_HNK.astype(jnp.float32))
  dots_HNC = jnp.einsum("...hnk,hck->...hnc", x_HNK, centroids_HCK)
  return 1.0 - 2.0 * dots_HNC + jnp.sum(centroids_HCK**2, -1)[:, None, :]


def kmeans_assign(x_HNK: jax.Array, centroids_HCK: jax.Array) -> jax.Array:
  """Nearest centroid of each unit-normalised vector: a_hn = argmin_c ||x^_hn - mu_hc||^2.

  x `[..., H, N, K]` (e.g. [B, H, T, K]), centroids `[H, C, K]`; returns int32 `[..., H, N]`.
  Roy et al. 2021, "Efficient Content-Based Sparse Attention with Routing Transformers".
  """
  return jnp.argmin(centroid_distances(x_HNK, centroids_HCK), axis=-1).astype(jnp.int32)


def kmeans_update(centroids_HCK: jax.Array, x_HNK: jax.Array, assignments_HN: jax.Array,
                  decay: float) -> jax.Array:
  """One online (mini-batch) k-means step: each centroid moves towards the mean of its members.

  mu_hc <- decay mu_hc + (1 - decay) mean{x^_hn : a_hn = c} (x^ unit-normalised, the mean over
  every leading axis of x `[..., H, N, K]`); a centroid with no member is unchanged. Roy et al.
  2021 move the centroids by the queries and keys together: pass both, concatenated along N.
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay={decay} must be in [0, 1)")
  num_clusters = centroids_HCK.shape[1]
  x_HNK = unit_normalize(x_HNK.astype(jnp.float32)).reshape(-1, *x_HNK.shape[-3:])
  onehot_HNC = jax.nn.one_hot(assignments_HN.reshape(-1, *assignments_HN.shape[-2:]),
                              num_clusters, dtype=jnp.float32)
  counts_HC = onehot_HNC.sum((0, 2))
  sums_HCK = jnp.einsum("bhnc,bhnk->hck", onehot_HNC, x_HNK)
  means_HCK = sums_HCK / jnp.maximum(counts_HC, 1.0)[..., None]
  moved_HCK = decay * centroids_HCK + (1.0 - decay) * means_HCK
  return jnp.where(counts_HC[..., None] > 0, moved_HCK, centroids_HCK)


def cluster_windows(x_BHTK: jax.Array, centroids_HCK: jax.Array,
                    size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The balanced clusters: for each cluster, its `size` members nearest the centroid.

  Member n of cluster c: a_n = c (`kmeans_assign`); window c lists the positions of the w = size
  members of smallest ||x^_n - mu_c||, padded with invalid slots when c has fewer.
  Returns (assignments int32 [B, H, T], idx_BHCW int32 positions, valid_BHCW bool).
  """
  dist_BHTC = centroid_distances(x_BHTK, centroids_HCK)
  assign_BHT = jnp.argmin(dist_BHTC, axis=-1).astype(jnp.int32)
  member_BHTC = assign_BHT[..., None] == jnp.arange(centroids_HCK.shape[1])
  closeness_BHCT = jnp.where(member_BHTC, -dist_BHTC, -jnp.inf).swapaxes(-1, -2)
  top_BHCW, idx_BHCW = jax.lax.top_k(closeness_BHCT, min(size, x_BHTK.shape[2]))
  return assign_BHT, idx_BHCW.astype(jnp.int32), top_BHCW > -jnp.inf


class SoftmaxPart(NamedTuple):
  """A softmax over part of each query's keys: running max m, l = sum_s exp(s - m), acc =
  sum_s exp(s - m) v_s, and the number of keys; m is finite, l = 0 for a query with none."""
  m: jax.Array
  l: jax.Array
  acc: jax.Array
  count: jax.Array


class RoutingStats(NamedTuple):
  """What routing decided: assignments of queries and keys `[B, H, T]`, the keys each query
  attended `[B, H, T]` and whether it sits in its cluster's window `[B, H, T]`."""
  assign_q: jax.Array
  assign_k: jax.Array
  keys: jax.Array
  routed: jax.Array


def _masked_part(scores: jax.Array, allowed: jax.Array, v: jax.Array) -> SoftmaxPart:
  """The `SoftmaxPart` of each row of scores [..., Q, S] over its allowed keys, v [..., S, K]."""
  allowed = jnp.broadcast_to(allowed, scores.shape)
  scores = jnp.where(allowed, scores, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(scores, -1))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m[..., None])
  return SoftmaxPart(m, p.sum(-1), jnp.einsum("...qs,...sk->...qk", p, v), allowed.sum(-1))


def local_part(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array, window: int,
               scale: float) -> SoftmaxPart:
  """Each query over its causal local window 0 <= t - s < window, in blocks of `window` tokens
  (query block r sees key blocks r - 1 and r): cost 2 T window per head."""
  batch, heads, length, head_dim = q_BHTK.shape
  num_blocks = -(-length // window)
  pad = num_blocks * window - length

  def blocked(x_BHTK):
    x_BHTK = jnp.pad(x_BHTK, [(0, 0), (0, 0), (0, pad), (0, 0)])
    return x_BHTK.reshape(batch, heads, num_blocks, window, head_dim)

  def with_previous(x_BHRWK):
    previous = jnp.pad(x_BHRWK, [(0, 0), (0, 0), (1, 0), (0, 0), (0, 0)])[:, :, :-1]
    return jnp.concatenate([previous, x_BHRWK], axis=3)

  k_BHRSK, v_BHRSK = with_previous(blocked(k_BHTK)), with_previous(blocked(v_BHTK))
  query_W1, key_1S = jnp.arange(window)[:, None] + window, jnp.arange(2 * window)[None, :]
  first_R11 = (jnp.arange(num_blocks) * window - window)[:, None, None]
  allowed_RWS = ((query_W1 - key_1S >= 0) & (query_W1 - key_1S < window)
                 & (first_R11 + key_1S >= 0))
  scores = jnp.einsum("bhrqk,bhrsk->bhrqs", blocked(q_BHTK), k_BHRSK) * scale
  part = _masked_part(scores, allowed_RWS, v_BHRSK)
  return SoftmaxPart(*(x.reshape(batch, heads, num_blocks * window, *x.shape[4:])[:, :, :length]
                       for x in part))


def _gather(x_BHTK: jax.Array, idx_BHCW: jax.Array) -> jax.Array:
  """x at the window positions: [B, H, C, W, K]."""
  idx_BHN = idx_BHCW.reshape(*idx_BHCW.shape[:2], -1)
  x_BHNK = jnp.take_along_axis(x_BHTK, idx_BHN[..., None], axis=2)
  return x_BHNK.reshape(*idx_BHCW.shape, x_BHTK.shape[-1])


def _scatter(x_BHCW: jax.Array, idx_BHCW: jax.Array, length: int) -> jax.Array:
  """Sum of the window entries x (zero where unused) back at their positions: [B, H, T, ...]."""
  idx_BHN = idx_BHCW.reshape(*idx_BHCW.shape[:2], -1)
  x_BHN = x_BHCW.reshape(*idx_BHN.shape, *x_BHCW.shape[4:])

  def one_row(idx_N, x_N):
    return jnp.zeros((length, *x_N.shape[1:]), x_N.dtype).at[idx_N].add(x_N)

  return jax.vmap(jax.vmap(one_row))(idx_BHN, x_BHN)


def routed_part(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                centroids_HCK: jax.Array, size: int, window: int,
                scale: float) -> tuple[SoftmaxPart, RoutingStats]:
  """Each query over the keys of its cluster window that are causal and outside its local
  window: t in window_c(q), s in window_c(k), t - s >= window. Cost C w^2 per head."""
  length = q_BHTK.shape[2]
  assign_q_BHT, idx_q_BHCW, valid_q_BHCW = cluster_windows(q_BHTK, centroids_HCK, size)
  assign_k_BHT, idx_k_BHCW, valid_k_BHCW = cluster_windows(k_BHTK, centroids_HCK, size)
  allowed_BHCWW = (valid_q_BHCW[..., :, None] & valid_k_BHCW[..., None, :]
                   & (idx_q_BHCW[..., :, None] - idx_k_BHCW[..., None, :] >= window))
  scores_BHCWW = jnp.einsum("bhcqk,bhcsk->bhcqs", _gather(q_BHTK, idx_q_BHCW),
                            _gather(k_BHTK, idx_k_BHCW)) * scale
  part = _masked_part(scores_BHCWW, allowed_BHCWW, _gather(v_BHTK, idx_k_BHCW))
  # A query sits in at most one valid slot (its own cluster's), so the scatter sums are exact.
  zeroed = SoftmaxPart(*(jnp.where(valid_q_BHCW.reshape(valid_q_BHCW.shape + (1,) * (x.ndim - 4)),
                                   x, 0) for x in part))
  part_T = SoftmaxPart(*(_scatter(x, idx_q_BHCW, length) for x in zeroed))
  routed_BHT = _scatter(valid_q_BHCW.astype(jnp.int32), idx_q_BHCW, length) > 0
  return part_T, RoutingStats(assign_q_BHT, assign_k_BHT, part_T.count, routed_BHT)


def merge_parts(a: SoftmaxPart, b: SoftmaxPart) -> SoftmaxPart:
  """The softmax over the union of two disjoint key sets: rescale both to their common max."""
  m = jnp.maximum(jnp.where(a.l > 0, a.m, -jnp.inf), jnp.where(b.l > 0, b.m, -jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  scale_a = jnp.exp(jnp.where(a.l > 0, a.m - m, -jnp.inf))
  scale_b = jnp.exp(jnp.where(b.l > 0, b.m - m, -jnp.inf))
  return SoftmaxPart(m, scale_a * a.l + scale_b * b.l,
                     scale_a[..., None] * a.acc + scale_b[..., None] * b.acc, a.count + b.count)


def routing_attention(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                      centroids_HCK: jax.Array, *, window: int, size: int,
                      scale: float | None = None) -> tuple[jax.Array, RoutingStats]:
  """Causal attention of each query over its local window and its cluster's routed keys.

  o_t = sum_{s in A_t} softmax_s(scale <q_t, k_s>) v_s with A_t = {s <= t : t - s < window} U
  {s <= t : a_q(t) = a_k(s) = c, t in window_c(q), s in window_c(k)}, a the nearest centroid
  (`kmeans_assign`) and window_c the `size` members nearest mu_c (`cluster_windows`). The local
  window holds t itself, so every query sees a key. Roy et al. 2021, "Efficient Content-Based
  Sparse Attention with Routing Transformers" (balanced routing; local and routing attention).
  Returns o `[B, H, T, K]` and the `RoutingStats`.
  """
  for name, value in (("window", window), ("size", size)):
    if value < 1:
      raise ValueError(f"{name}={value} must be a positive int")
  if q_BHTK.ndim != 4 or not q_BHTK.shape == k_BHTK.shape == v_BHTK.shape:
    raise ValueError(f"q, k and v must be [B, H, T, K] alike, got {q_BHTK.shape}, "
                     f"{k_BHTK.shape} and {v_BHTK.shape}")
  scale = q_BHTK.shape[-1] ** -0.5 if scale is None else scale
  local = local_part(q_BHTK, k_BHTK, v_BHTK, window, scale)
  routed, stats = routed_part(q_BHTK, k_BHTK, v_BHTK, centroids_HCK, size, window, scale)
  total = merge_parts(local, routed)
  o_BHTK = total.acc / total.l[..., None]
  return o_BHTK, stats._replace(keys=total.count)


def cluster_balance(assign_BHN: jax.Array, num_clusters: int) -> jax.Array:
  """Mean over heads of the normalised entropy of the cluster sizes, H(n_c / N) / log C: 1 for
  equal clusters, 0 when every vector joins one."""
  if num_clusters == 1:
    return jnp.ones((), jnp.float32)
  onehot = jax.nn.one_hot(assign_BHN, num_clusters, dtype=jnp.float32)
  share_HC = onehot.sum((0, 2)) / (onehot.shape[0] * onehot.shape[2])
  entropy_H = -jnp.sum(jnp.where(share_HC > 0, share_HC * jnp.log(share_HC), 0.0), -1)
  return jnp.mean(entropy_H) / jnp.log(float(num_clusters))


@ATTENTIONS.register("routing")
class RoutingAttention(nn.Module):
  """Multi-head causal self-attention over a local window plus content-routed keys (k-means).

  q, k, v = x W_q, x W_k, x W_v (RoPE on q and k when positions == "rope"); head h attends as
  `routing_attention` with its centroids mu_h `[C, K]`: the last `window` keys, plus the keys
  routed to the query's cluster (each cluster keeps its `cluster_size` nearest queries and keys;
  default ceil(T / C), the balanced size); y = concat_h(o_h) W_o. Same params as
  `CausalSelfAttention`. Every head is both a local and a routing head (the paper mixes local
  and routing heads; here their key sets are unioned in one softmax). Centroids: variable
  "centroids" `[H, C, K]` in collection "kmeans" (random unit vectors at init); a call with
  deterministic=False and "kmeans" mutable applies `kmeans_update` with `decay` to the queries
  and keys of the batch, after routing it with the old centroids. aux metrics:
  "attended_fraction" (mean over batch, heads and queries of |A_t| / (t + 1)), "routed_fraction"
  (queries inside their cluster's window) and "cluster_balance" (`cluster_balance` of the query
  and key assignments). Site "heads": o_BTHK.
  Roy et al. 2021, "Efficient Content-Based Sparse Attention with Routing Transformers".
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  dtype: Any = jnp.float32
  rope_max_wavelength: float = 10_000.0
  num_clusters: int = 4
  cluster_size: int | None = None
  window: int = 16
  decay: float = 0.99

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    self._check_fields()
    head_dim, length = self.d_model // self.num_heads, x_BTD.shape[1]
    centroids = self.variable(KMEANS, "centroids", lambda: unit_normalize(jax.random.normal(
        self.make_rng("params"), (self.num_heads, self.num_clusters, head_dim))))
    q_BHTK, k_BHTK, v_BHTK = (x.swapaxes(1, 2) for x in project_qkv(self, x_BTD))
    size = self.cluster_size or -(-length // self.num_clusters)
    o_BHTK, stats = routing_attention(q_BHTK, k_BHTK, v_BHTK, centroids.value,
                                      window=self.window, size=size)
    if not deterministic and self.is_mutable_collection(KMEANS) and not self.is_initializing():
      qk_BHNK = jax.lax.stop_gradient(jnp.concatenate([q_BHTK, k_BHTK], axis=2))
      centroids.value = kmeans_update(centroids.value, qk_BHNK, jnp.concatenate(
          [stats.assign_q, stats.assign_k], axis=2), self.decay)
    o_BTHK = Site(name="heads")(o_BHTK.swapaxes(1, 2))
    metrics = {
        "attended_fraction": jnp.mean(stats.keys / jnp.arange(1, length + 1)),
        "routed_fraction": jnp.mean(stats.routed.astype(jnp.float32)),
        "cluster_balance": cluster_balance(jnp.concatenate([stats.assign_q, stats.assign_k], 2),
                                           self.num_clusters),
    }
    return project_out(self, o_BTHK), {"losses": {}, "metrics": metrics}

  def _check_fields(self) -> None:
    check_attention_fields(self.d_model, self.num_heads, self.positions)
    for name in ("num_clusters", "window"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be a positive int")
    if self.cluster_size is not None and self.cluster_size < 1:
      raise ValueError(f"cluster_size={self.cluster_size} must be a positive int or None")
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"decay={self.decay} must be in [0, 1)")
