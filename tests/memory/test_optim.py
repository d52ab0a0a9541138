"""The value-table learning rate: labels and one optimizer step against hand-computed updates."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.memory import optim


def params_tree():
  rng = np.random.default_rng(0)
  memory = {
      "query": jnp.asarray(rng.normal(size=(4, 2, 6)), jnp.float32),
      "subkeys": jnp.asarray(rng.normal(size=(2, 2, 3, 3)), jnp.float32),
      "values": jnp.asarray(rng.normal(size=(9, 4)), jnp.float32),
  }
  other = {"values": jnp.ones((3, 4)), "kernel": jnp.ones((4, 4))}
  return {"layer_0": {"ffn": other}, "layer_1": {"ffn": memory}}


def test_labels_pick_only_memory_value_tables():
  labels = optim.value_lr_labels(params_tree())
  assert labels == {
      "layer_0": {"ffn": {"values": "default", "kernel": "default"}},
      "layer_1": {"ffn": {"query": "default", "subkeys": "default", "values": "memory_values"}},
  }


def test_labels_without_a_value_table_are_an_error():
  with pytest.raises(ValueError, match="no product-key memory value table"):
    optim.value_lr_labels({"dense": {"values": jnp.ones(3), "kernel": jnp.ones(2)}})


def grads_reading_rows(params, rows):
  """Gradients of 1 everywhere except memory values, which are non-zero only on `rows`."""
  grads = jax.tree.map(jnp.ones_like, params)
  value_grad = np.zeros(params["layer_1"]["ffn"]["values"].shape, np.float32)
  value_grad[rows] = -2.0
  grads["layer_1"]["ffn"]["values"] = jnp.asarray(value_grad)
  return grads


def updates_of(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_sgd_step_uses_the_value_learning_rate_on_values_only():
  params = params_tree()
  grads = grads_reading_rows(params, [1, 5])
  tx = optim.make_memory_optimizer(optax.sgd, learning_rate=0.1, value_learning_rate=2.0)
  updates = updates_of(tx, params, grads)
  np.testing.assert_allclose(
      updates["layer_1"]["ffn"]["values"], -2.0 * grads["layer_1"]["ffn"]["values"]
  )
  for path in (("layer_1", "ffn", "query"), ("layer_1", "ffn", "subkeys"),
               ("layer_0", "ffn", "values"), ("layer_0", "ffn", "kernel")):
    update = updates[path[0]][path[1]][path[2]]
    np.testing.assert_allclose(update, -0.1 * np.ones(update.shape), err_msg="/".join(path))


def test_first_adam_step_moves_read_value_rows_by_the_value_learning_rate():
  params = params_tree()
  grads = grads_reading_rows(params, [0, 4, 8])
  tx = optax.chain(
      optax.clip_by_global_norm(1e6),
      optim.make_memory_optimizer(lambda lr: optax.adam(lr, eps=1e-12), 1e-3, 5e-2),
  )
  updates = updates_of(tx, params, grads)
  value_update = np.asarray(updates["layer_1"]["ffn"]["values"])
  # Adam's first step is -lr * g / |g| = -lr * sign(g) (bias-corrected moments).
  np.testing.assert_allclose(value_update[[0, 4, 8]], 5e-2, rtol=1e-5)
  np.testing.assert_array_equal(value_update[[1, 2, 3, 5, 6, 7]], 0.0)
  np.testing.assert_allclose(updates["layer_1"]["ffn"]["subkeys"], -1e-3, rtol=1e-5)
  np.testing.assert_allclose(updates["layer_0"]["ffn"]["values"], -1e-3, rtol=1e-5)


def test_schedules_are_accepted():
  params = params_tree()
  grads = grads_reading_rows(params, [2])
  tx = optim.make_memory_optimizer(
      optax.sgd, optax.constant_schedule(0.5), optax.linear_schedule(3.0, 0.0, 10)
  )
  updates = updates_of(tx, params, grads)
  np.testing.assert_allclose(updates["layer_1"]["ffn"]["values"][2], 6.0)
  np.testing.assert_allclose(updates["layer_1"]["ffn"]["query"], -0.5)
