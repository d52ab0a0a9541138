"""Polar Sparsity head routing against hand cases, NumPy attention and CausalSelfAttention."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.activations import head_routing as hr
from sparsejax.models import CausalSelfAttention

B, T, D, H = 3, 5, 16, 4


@functools.cache
def _params():
  """One layer's params (they depend on neither positions nor head_fraction), unboxed."""
  layer = hr.HeadRoutedAttention(d_model=D, num_heads=H)
  return nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, T, D)))["params"])


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_attention_heads(x, p):
  """NumPy causal multi-head attention without positions: o_BTHK."""
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[name]) for name in ("wq", "wk", "wv"))
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.tril(np.ones((x.shape[1],) * 2, bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", probs, v)


def test_select_heads_mask_recall_and_loss_hand_case():
  scores = jnp.array([[[3.0, 0.0, 1.0]], [[-1.0, 2.0, 1.0]]])  # B=2, T=1, H=3
  importance = jnp.array([[[0.0, 5.0, 4.0]], [[3.0, 2.0, 1.0]]])  # oracles {1, 2}, {0, 1}

  @jax.jit
  def route(scores, importance):
    idx = hr.select_heads(scores, 2)
    return (idx, hr.head_mask(idx, 3), hr.router_recall(idx, importance),
            hr.router_loss(scores, importance, 2))

  idx, mask, recall, loss = route(scores, importance)
  np.testing.assert_array_equal(idx, [[0, 1]])  # batch means [1, 1, 1]: ties to the lower index
  np.testing.assert_array_equal(mask, [[True, True, False]])
  np.testing.assert_allclose(recall, (1 / 2 + 2 / 2) / 2)
  labels = np.array([[0, 1, 1], [1, 1, 0]], np.float64)
  s = np.array([[3.0, 0.0, 1.0], [-1.0, 2.0, 1.0]])
  bce = np.log1p(np.exp(-s)) * labels + np.log1p(np.exp(s)) * (1 - labels)
  np.testing.assert_allclose(loss, bce.mean(), rtol=1e-6)


def test_masked_layer_matches_numpy_and_trains_the_router_by_its_aux_loss():
  x = _rand(0, B, T, D)
  layer = hr.HeadRoutedAttention(d_model=D, num_heads=H, positions="learned",
                                 head_fraction=0.5, router_loss_coef=0.5)
  params = _params()
  loss = lambda router: layer.apply({"params": {**params, "router": router}}, x)[1]["losses"][
      "router"]
  (y, aux), router_grad = jax.jit(lambda p: (
      layer.apply({"params": p}, x), jax.grad(loss)(p["router"])))(params)
  p = jax.tree.map(np.asarray, params)
  o = _np_attention_heads(x, p)
  scores = x @ p["router"]
  keep = np.argsort(-scores.mean(0), axis=-1, kind="stable")[:, :2]  # [T, 2]
  mask = np.zeros((T, H), bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  expected = np.einsum("bthk,hkd->btd", np.where(mask[None, :, :, None], o, 0), p["wo"])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  norms = np.linalg.norm(o, axis=-1)
  oracle = np.argsort(-norms, axis=-1, kind="stable")[..., :2]
  labels = np.zeros((B, T, H))
  np.put_along_axis(labels, oracle, 1, axis=-1)
  bce = np.log1p(np.exp(-scores)) * labels + np.log1p(np.exp(scores)) * (1 - labels)
  np.testing.assert_allclose(aux["losses"]["router"], 0.5 * bce.mean(), rtol=1e-4)
  recall = np.take_along_axis(mask[None].repeat(B, 0), oracle, axis=-1).mean()
  np.testing.assert_allclose(aux["metrics"]["router_recall"], recall, rtol=1e-6)
  assert float(aux["metrics"]["active_fraction"]) == 0.5
  d_scores = 0.5 * (1 / (1 + np.exp(-scores)) - labels) / labels.size
  np.testing.assert_allclose(router_grad, np.einsum("btd,bth->dh", x, d_scores), rtol=1e-4,
                             atol=1e-6)


def test_all_heads_equal_causal_self_attention_exactly():
  x = _rand(1, B, T, D)
  layer = hr.HeadRoutedAttention(d_model=D, num_heads=H, head_fraction=1.0)
  params = _params()
  dense = CausalSelfAttention(d_model=D, num_heads=H)
  dense_params = {name: value for name, value in params.items() if name != "router"}
  y, y_dense = jax.jit(lambda p, dense_p: (layer.apply({"params": p}, x)[0],
                                           dense.apply({"params": dense_p}, x)[0]))(
      params, dense_params)
  np.testing.assert_array_equal(y, y_dense)


def test_gathered_decode_equals_the_masked_layer_at_the_last_position():
  x = _rand(2, B, T, D)
  layer = hr.HeadRoutedAttention(d_model=D, num_heads=H, head_fraction=0.5)
  params = _params()
  y, (y_last, idx) = jax.jit(lambda p: (layer.apply({"params": p}, x)[0],
                                        hr.head_routed_decode(p, x, 2)))(params)
  np.testing.assert_allclose(y_last, y[:, -1], rtol=1e-4, atol=1e-5)
  router = np.asarray(params["router"])
  expected_idx = np.argsort(-(x[:, -1] @ router).mean(0), kind="stable")[:2]
  np.testing.assert_array_equal(idx, expected_idx)


def test_errors():
  with pytest.raises(ValueError, match="k=5; allowed: an int in \\[1, 4\\]"):
    hr.select_heads(jnp.ones((1, 1, 4)), 5)
  layer = hr.HeadRoutedAttention(d_model=D, num_heads=H, head_fraction=0.0)
  with pytest.raises(ValueError, match="head_fraction=0.0; allowed: a fraction in"):
    layer.init(jax.random.key(0), jnp.ones((1, 2, D)))


def test_routed_layer_is_causal_in_time():
  """Changing the tokens after position t (in every sequence) leaves y[:, :t + 1] unchanged,
  with k < H: the head choice at t reads position t only."""
  x = _rand(3, B, T, D)
  changed = x.copy()
  changed[:, 3:] = _rand(4, B, T - 3, D)
  layer = hr.HeadRoutedAttention(d_model=D, num_heads=H, head_fraction=0.5)
  y, y_changed = jax.jit(jax.vmap(lambda x: layer.apply({"params": _params()}, x)[0]))(
      jnp.stack([x, changed]))
  np.testing.assert_array_equal(y[:, :3], y_changed[:, :3])
  assert not np.allclose(y[:, 3:], y_changed[:, 3:])
