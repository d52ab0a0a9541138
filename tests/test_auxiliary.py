"""The aux convention: merging prefixed sublayer aux, and the total of every loss, however nested."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax.auxiliary import empty_aux, merge_aux


def test_total_aux_loss_of_one_layer_sums_its_losses_not_its_metrics():
  aux = {"losses": {"load_balance": jnp.float32(0.25), "router_z": jnp.float32(0.5)},
         "metrics": {"expert_load_E": jnp.ones(4), "dropped_fraction": jnp.float32(3.0)}}
  assert float(sparsejax.total_aux_loss(aux)) == 0.75


def test_total_aux_loss_sums_every_losses_dict_however_nested():
  moe_aux = {"losses": {"load_balance": 0.25, "router_z": 0.125}, "metrics": {"load": 9.0}}
  memory_aux = {"losses": {}, "metrics": {"memory_usage": 0.5}}
  encoder_aux = {"block_0": {"losses": {"l0": jnp.float32(1.5)}, "metrics": {}},
                 "block_1": {"losses": {"nested": {"a": 2.0, "b": jnp.array([0.5, 0.25])}},
                             "metrics": {"losses_seen": 100.0}}}
  aux = {"moe": moe_aux, "memory": memory_aux, "encoder": encoder_aux, "step": 3}
  # 0.25 + 0.125 (moe) + 0 (memory) + 1.5 (block_0) + 2.0 + 0.5 + 0.25 (block_1, array summed).
  total = sparsejax.total_aux_loss(aux)
  assert total.dtype == jnp.float32 and total.shape == ()
  assert float(total) == 4.625


def test_total_aux_loss_of_a_merged_model_aux_equals_the_sum_of_its_layers():
  first = {"losses": {"load_balance": 0.5}, "metrics": {}}
  second = {"losses": {"load_balance": 0.25, "router_z": 1.0}, "metrics": {}}
  model_aux = merge_aux("layer_1", second, merge_aux("layer_0", first, empty_aux()))
  assert float(sparsejax.total_aux_loss(model_aux)) == 1.75


def test_total_aux_loss_is_zero_without_losses_and_differentiable_under_jit():
  assert float(sparsejax.total_aux_loss(empty_aux())) == 0.0
  assert float(sparsejax.total_aux_loss({"metrics": {"x": 1.0}})) == 0.0

  def loss(w):
    return sparsejax.total_aux_loss({"a": {"losses": {"l2": jnp.sum(w**2)}, "metrics": {}},
                                     "b": {"losses": {"l1": jnp.sum(jnp.abs(w))}}})

  w = jnp.array([1.0, -2.0])
  value, grad = jax.jit(jax.value_and_grad(loss))(w)
  assert float(value) == 8.0  # (1 + 4) + (1 + 2)
  np.testing.assert_array_equal(grad, [3.0, -5.0])  # 2 w + sign(w)


def test_merge_aux_prefixes_keys_and_rejects_collisions_and_bad_kinds():
  merged = merge_aux("ffn", {"losses": {"z": 1.0}, "metrics": {"m": 2.0}}, empty_aux())
  assert merged == {"losses": {"ffn/z": 1.0}, "metrics": {"ffn/m": 2.0}}
  with pytest.raises(ValueError, match="aux losses key 'ffn/z' is already present"):
    merge_aux("ffn", {"losses": {"z": 3.0}, "metrics": {}}, merged)
  with pytest.raises(ValueError, match="must have exactly the keys 'losses' and 'metrics'"):
    merge_aux("ffn", {"losses": {}}, empty_aux())
