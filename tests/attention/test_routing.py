"""Routing attention against NumPy: the k-means assignment and EMA step, the balanced clusters and
dense softmax attention under the equivalent explicit boolean mask; the layer's centroid state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.attention.routing import (
    KMEANS,
    RoutingAttention,
    SoftmaxPart,
    kmeans_assign,
    kmeans_update,
    merge_parts,
    routing_attention,
)

B, H, T, K, C = 2, 2, 13, 4, 3


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _np_assign(x_BHNK, centroids_HCK):
  """argmin_c ||x^ - mu_c||^2, looping over heads."""
  x = _unit(np.asarray(x_BHNK, np.float64))
  mu = np.asarray(centroids_HCK, np.float64)
  dist = ((x[:, :, :, None, :] - mu[None, :, None, :, :]) ** 2).sum(-1)
  return dist.argmin(-1), dist


def _np_update(centroids_HCK, x_BHNK, assign_BHN, decay):
  """Per head and cluster: decay mu + (1 - decay) mean of the members, unchanged when empty."""
  x = _unit(np.asarray(x_BHNK, np.float64))
  out = np.array(centroids_HCK, np.float64)
  for h in range(out.shape[0]):
    for c in range(out.shape[1]):
      members = x[:, h][assign_BHN[:, h] == c]
      if len(members):
        out[h, c] = decay * out[h, c] + (1 - decay) * members.mean(0)
  return out


def test_kmeans_assign_and_update_match_numpy_step():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, H, 9, K)).astype(np.float32)
  centroids = rng.normal(size=(H, C, K)).astype(np.float32)
  centroids[1, 2] = 50.0  # far from every unit vector: an empty cluster
  @jax.jit
  def step(x, centroids):
    assign = kmeans_assign(x, centroids)
    return assign, kmeans_update(centroids, x, assign, 0.9)

  assign, updated = step(x, centroids)
  want_assign, _ = _np_assign(x, centroids)
  np.testing.assert_array_equal(assign, want_assign)
  assert not (want_assign[:, 1] == 2).any()
  np.testing.assert_allclose(updated, _np_update(centroids, x, want_assign, 0.9), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(updated[1, 2], centroids[1, 2])
  with pytest.raises(ValueError, match="decay=1.0"):
    kmeans_update(jnp.asarray(centroids), jnp.asarray(x), jnp.asarray(assign), 1.0)


def _np_routing_mask(q, k, centroids, size, window):
  """bool [B, H, T, T]: causal and (local window or same cluster with both in its `size` nearest),
  plus whether each query is in its cluster's window."""
  def in_window(x):
    assign, dist = _np_assign(x, centroids)
    kept = np.zeros(assign.shape, bool)
    for b, h, c in np.ndindex(B, H, C):
      members = np.flatnonzero(assign[b, h] == c)
      kept[b, h, members[np.argsort(dist[b, h, members, c])[:size]]] = True
    return assign, kept

  assign_q, kept_q = in_window(q)
  assign_k, kept_k = in_window(k)
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  routed = ((assign_q[..., :, None] == assign_k[..., None, :])
            & kept_q[..., :, None] & kept_k[..., None, :])
  return (s <= t) & ((t - s < window) | routed), kept_q


def test_routing_attention_matches_dense_masked_attention_and_its_gradient():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(B, H, T, K)).astype(np.float32) for _ in range(3))
  centroids = _unit(rng.normal(size=(H, C, K))).astype(np.float32)
  size, window = 3, 3  # T = 13: ragged local blocks; clusters of ~9 members overflow size 3
  mask, kept_q = _np_routing_mask(q, k, centroids, size, window)
  assert (mask.sum(-1) > np.minimum(np.arange(T) + 1, window)).any()  # routing adds keys

  def routed(q, k, v):
    return routing_attention(q, k, v, jnp.asarray(centroids), window=window, size=size)

  scores = np.einsum("bhtk,bhsk->bhts", q.astype(np.float64), k) / np.sqrt(K)
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)

  def dense(q, k, v):
    s = jnp.where(mask, jnp.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(K), -jnp.inf)
    return jnp.einsum("bhts,bhsk->bhtk", jax.nn.softmax(s, -1), v)

  cotangent = rng.normal(size=(B, H, T, K)).astype(np.float32)

  @jax.jit
  def outputs_and_grads(q, k, v):
    return (routed(q, k, v),
            jax.grad(lambda *a: jnp.sum(routed(*a)[0] * cotangent), (0, 1, 2))(q, k, v),
            jax.grad(lambda *a: jnp.sum(dense(*a) * cotangent), (0, 1, 2))(q, k, v))

  (o, stats), grads, want_grads = outputs_and_grads(q, k, v)
  np.testing.assert_allclose(o, np.einsum("bhts,bhsk->bhtk", probs, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stats.keys, mask.sum(-1))
  np.testing.assert_array_equal(stats.routed, kept_q)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_layer_updates_centroids_only_when_not_deterministic():
  d_model = H * K
  layer = RoutingAttention(d_model=d_model, num_heads=H, positions="learned", num_clusters=C,
                           window=2, decay=0.5)
  x = jax.random.normal(jax.random.key(0), (B, T, d_model))
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  apply = jax.jit(layer.apply, static_argnames=("deterministic", "mutable"))
  centroids = np.asarray(variables[KMEANS]["centroids"])
  assert centroids.shape == (H, C, K)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=-1), 1.0, rtol=1e-5)
  (_, aux), state = apply(variables, x, deterministic=True, mutable=(KMEANS,))
  np.testing.assert_array_equal(state[KMEANS]["centroids"], centroids)
  assert set(aux["metrics"]) == {"attended_fraction", "routed_fraction", "cluster_balance"}
  (_, aux), state = apply(variables, x, deterministic=False, mutable=(KMEANS,))
  params = {name: np.asarray(p.value, np.float64) for name, p in variables["params"].items()}
  q, k = (np.einsum("btd,dhk->bhtk", np.asarray(x, np.float64), params[name])
          for name in ("wq", "wk"))
  qk = np.concatenate([q, k], axis=2)
  assign = np.concatenate([_np_assign(q, centroids)[0], _np_assign(k, centroids)[0]], axis=2)
  np.testing.assert_allclose(state[KMEANS]["centroids"], _np_update(centroids, qk, assign, 0.5),
                             rtol=1e-4, atol=1e-5)
  assert 0.0 < float(aux["metrics"]["attended_fraction"]) < 1.0
  with pytest.raises(ValueError, match="num_clusters=0"):
    RoutingAttention(d_model=d_model, num_heads=H, num_clusters=0).init(jax.random.key(1), x)


def test_merge_ignores_an_empty_part_far_above_the_other():
  """Hand-worked: a part with no keys (l = 0, m = 0) next to one whose max is -200."""
  far = SoftmaxPart(jnp.array([-200.0]), jnp.array([2.0]), jnp.array([[6.0]]), jnp.array([3]))
  empty = SoftmaxPart(jnp.array([0.0]), jnp.array([0.0]), jnp.array([[0.0]]), jnp.array([0]))
  merged = jax.jit(merge_parts)(empty, far)
  np.testing.assert_allclose(merged.acc / merged.l[:, None], [[3.0]])
  assert int(merged.count[0]) == 3
