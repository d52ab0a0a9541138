"""Boxed Flax params, as `model.init` returns them (`nn.with_logical_partitioning`): a boxed leaf
has the path of its box, so rules, distributions, updaters, `wrap` and sparse checkpoints treat
boxed and unboxed params alike."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sparsejax import masks
from sparsejax.masks import schedules
from sparsejax.masks import updaters as U
from sparsejax.models import build_lm
from sparsejax.models.mlp import build_classifier


def _moe_lm_variables():
  config = ml_collections.ConfigDict({
      "d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32, "max_len": 8,
      "ffn": {"name": "moe", "num_experts": 4, "k": 2}})
  return build_lm(config, vocab_size=32).init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))


def _assert_same_mask(a, b):
  assert a.structures == b.structures
  for x, y in zip(jax.tree.leaves(a.leaves), jax.tree.leaves(b.leaves), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_dense_rule_keeps_a_boxed_router_dense():
  variables = _moe_lm_variables()
  router = "params/layer_0/ffn/router_DE"
  assert any(
      masks.is_box(node) for node in jax.tree.leaves(variables, is_leaf=masks.is_box))
  rules = ((r"router_DE$", "dense"), (r"wi_EDF$", "fan_in"))
  boxed = masks.make_mask(variables, 0.3, "erk", rules=rules, key=jax.random.key(1))
  assert boxed.structure_of(router) == "dense" and bool(boxed.flat()[router].all())
  assert boxed.structure_of("params/layer_0/ffn/wi_EDF") == "fan_in"
  unboxed = masks.make_mask(nn.unbox(variables), 0.3, "erk", rules=rules, key=jax.random.key(1))
  _assert_same_mask(boxed, unboxed)
  assert (masks.layer_densities(variables, 0.3, "erk", rules=rules)
          == masks.layer_densities(nn.unbox(variables), 0.3, "erk", rules=rules))


def _mlp():
  model = build_classifier({"name": "mlp", "hidden": (16,)}, num_classes=4)
  return model, model.init(jax.random.key(0), jnp.ones((2, 8)))["params"]


def _train(model, params, mask, updater, steps=6):
  tx = masks.wrap(optax.adam(0.05), updater, schedules.Constant(0.5, update_every=2), mask)
  x = jax.random.normal(jax.random.key(1), (8, 8))
  y = jnp.arange(8) % 4

  def loss(p):
    logits, _ = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, state):
    grads = jax.grad(loss)(masks.get_mask(state).apply(p))
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, masks.get_mask(state)


@pytest.mark.parametrize("updater", [U.RigL(exploration=1e-2), U.SRigL(exploration=1e-2)])
def test_wrap_trains_boxed_params_exactly_like_unboxed(updater):
  model, boxed = _mlp()
  rules = ((r"layer_0/kernel$", "fan_in"),)
  mask = masks.make_mask(boxed, 0.3, rules=rules, key=jax.random.key(2))
  assert mask.structure_of("layer_0/kernel") == "fan_in"
  trained_boxed, mask_boxed = _train(model, boxed, mask, updater)
  unboxed_mask = masks.make_mask(nn.unbox(boxed), 0.3, rules=rules, key=jax.random.key(2))
  trained, mask_unboxed = _train(model, nn.unbox(boxed), unboxed_mask, updater)
  _assert_same_mask(mask_boxed, mask_unboxed)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mask_boxed.leaves),
                                                      jax.tree.leaves(mask.leaves)))
  assert jax.tree.structure(trained_boxed) == jax.tree.structure(boxed)
  for a, b in zip(jax.tree.leaves(trained_boxed), jax.tree.leaves(trained), strict=True):
    np.testing.assert_array_equal(a, b)
  # An unboxed mask applies to boxed params and a boxed one to unboxed params.
  for a, b in zip(jax.tree.leaves(unboxed_mask.apply(boxed)),
                  jax.tree.leaves(mask.apply(nn.unbox(boxed))), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sparse_checkpoint_of_boxed_params_restores_boxed_or_unboxed(tmp_path):
  _, params = _mlp()
  mask = masks.make_mask(params, 0.25, key=jax.random.key(3))
  masks.save_sparse(str(tmp_path / "ckpt"), mask.apply(params), mask)
  for target in (params, nn.unbox(params)):
    restored, restored_mask = masks.restore_sparse(str(tmp_path / "ckpt"), target=target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    _assert_same_mask(restored_mask, mask)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(mask.apply(params)), strict=True):
      np.testing.assert_array_equal(a, b)
