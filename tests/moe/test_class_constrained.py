"""Class-constrained conv MoE: assignment, routing constraint, free test routing, frequency."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "class_constrained_moe")
from sparsejax.models import SmallCNN
from sparsejax.moe import class_constrained
from sparsejax.registry import FFNS

B, H, W, C, E, F = 3, 2, 2, 4, 3, 5


def _make(**kwargs):
  return FFNS.get("class_constrained_moe")(d_model=C, d_ff=F, **{
      "num_experts": E, "k": 1, "num_classes": 3, "experts_per_class": 1, "expert": "ffn",
      "implementation": "reference", "tile": 4, **kwargs})


def test_assignment_hand_worked():
  expected = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 0]], bool)  # (c * 2 + j) mod 3
  np.testing.assert_array_equal(class_constrained.class_expert_assignment(4, 3, 2), expected)
  with pytest.raises(ValueError, match="experts_per_class"):
    class_constrained.class_expert_assignment(4, 3, 4)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_training_routes_within_the_class_and_test_routing_is_free():
  layer = _make()  # granularity "image": an image's positions share its mean logits
  x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(B, H, W, C))) + 0.1, jnp.float32)
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"])
  rng = np.random.default_rng(1)
  params = {name: jnp.asarray(rng.normal(size=shapes[name].shape), jnp.float32)
            for name in ("wi_EDF", "wo_EFD")}
  router_DE = np.zeros((C, E), np.float32)
  router_DE[:, 0] = 1.0  # unconstrained, every image (x > 0) prefers expert 0
  variables = {"params": {**params, "router_DE": jnp.asarray(router_DE)}}
  labels = jnp.array([0, 1, 2])  # with one expert per class, class c owns expert c

  @jax.jit
  def trained_and_free(v):
    constrained = layer.apply(v, x, labels_B=labels, mutable=["intermediates"])
    return constrained, layer.apply(v, x, mutable=["intermediates"])[1]

  ((y, aux), state), free = trained_and_free(variables)
  experts = np.asarray(state["intermediates"][class_constrained.ROUTES][0])
  np.testing.assert_array_equal(experts[:, 0], np.repeat([0, 1, 2], H * W))
  np.testing.assert_array_equal(free["intermediates"][class_constrained.ROUTES][0], 0)
  x_TD = np.asarray(x, np.float64).reshape(-1, C)
  logits_BE = x_TD.reshape(B, H * W, C).mean(axis=1) @ router_DE  # the images' mean logits
  probs_BE = np.exp(logits_BE) / np.exp(logits_BE).sum(axis=1, keepdims=True)
  p = {name: np.asarray(variables["params"][name], np.float64) for name in ("wi_EDF", "wo_EFD")}
  ffn = lambda t, e: _gelu(x_TD[t] @ p["wi_EDF"][e]) @ p["wo_EFD"][e]
  expected = np.stack([probs_BE[t // (H * W), e] * ffn(t, e)  # gates of the unmasked router
                       for t, e in enumerate(np.repeat([0, 1, 2], H * W))])
  np.testing.assert_allclose(y.reshape(-1, C), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["losses"]["class_routing"],
                             -np.mean(np.log(probs_BE[[0, 1, 2], [0, 1, 2]])), rtol=1e-5)
  np.testing.assert_allclose(aux["metrics"]["router_class_accuracy"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"], [1 / 3] * 3, rtol=1e-6)


def test_position_routing_is_per_token_and_image_routing_per_group():
  x_TD = jnp.array([[3., 0., 0.], [0., 0., 2.], [0., 1., 0.], [0., 2., 0.]])
  allowed_TE = jnp.array([[0, 0, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]], bool)

  @jax.jit
  def choices():
    route = lambda allowed, g: class_constrained.route_class_constrained(
        {"router_DE": jnp.eye(3)}, x_TD, allowed_TE=allowed, k=1,
        group_size=g).plan.expert_TK[:, 0]
    return route(None, 1), route(None, 2), route(allowed_TE, 1)

  free, grouped, constrained = choices()
  np.testing.assert_array_equal(free, [0, 2, 1, 1])
  np.testing.assert_array_equal(grouped, [0, 0, 1, 1])  # group means (1.5, 0, 1), (0, 1.5, 0)
  np.testing.assert_array_equal(constrained, [2, 2, 1, 1])


def test_routing_frequency_matches_a_naive_count():
  rng = np.random.default_rng(1)
  num_tokens, k, num_classes = 40, 2, 4
  experts = rng.integers(0, E, size=(num_tokens, k))
  keep = rng.random((num_tokens, k)) < 0.8
  labels = rng.integers(0, num_classes - 1, size=num_tokens)  # the last class has no tokens
  counts = np.zeros((num_classes, E))
  for t in range(num_tokens):
    for j in range(k):
      if keep[t, j]:
        counts[labels[t], experts[t, j]] += 1
  totals = counts.sum(axis=1, keepdims=True)
  expected = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
  freq = jax.jit(class_constrained.routing_frequency, static_argnums=(3, 4))(
      experts, keep, labels, num_classes, E)
  np.testing.assert_allclose(freq, expected, rtol=1e-6)


def test_small_cnn_passes_labels_to_the_layer():
  model = SmallCNN(num_classes=3, channels=C, num_blocks=1, d_ff=F, image_shape=(H, W, 1),
                   ffn="class_constrained_moe", ffn_kwargs=(
                       ("num_experts", E), ("k", 1), ("num_classes", 3),
                       ("experts_per_class", 1)))
  images = jnp.zeros((B, H * W))
  (logits, _), state = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), images, labels_B=jnp.zeros((B,), jnp.int32), mutable=True))
  assert logits.shape == (B, 3)
  sown = state["intermediates"]["block_0"]["ffn"][class_constrained.ROUTES][0]
  assert sown.shape == (B * H * W, 1)
  wrong = model.clone(ffn_kwargs=(("num_experts", E), ("k", 1), ("num_classes", 10)))
  with pytest.raises(ValueError, match="num_classes=10, but the classifier has 3 classes"):
    jax.eval_shape(lambda: wrong.init(jax.random.PRNGKey(0), images))


def test_errors():
  for kwargs, match in [({"k": 2, "experts_per_class": 1}, "k=2"),
                        ({"router": "expert_choice"}, "top_k"),
                        ({"experts_per_class": E + 1}, "experts_per_class")]:
    with pytest.raises(ValueError, match=match):
      _make(**kwargs)
  with pytest.raises(ValueError, match="4-D"):
    _make().init(jax.random.PRNGKey(0), jnp.zeros((B, H * W, C)))
