"""Balancing losses against numpy formulas; aux-loss-free bias balancing."""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from sparsejax.moe import balance
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from tests.moe import reference

T, E = 13, 5


def _logits(seed=0):
  return np.random.default_rng(seed).normal(size=(T, E)).astype(np.float32)


def test_load_balance_loss_matches_switch_formula():
  logits = _logits()
  routed, aux = routing.route_top_k(jnp.asarray(logits), k=2)
  fraction = balance.expert_fraction(routed)
  experts, _ = reference.top_k(logits, 2)
  expected_fraction = np.bincount(experts.ravel(), minlength=E) / experts.size
  np.testing.assert_allclose(fraction, expected_fraction, rtol=1e-6)
  expected = E * np.sum(expected_fraction * reference.softmax(logits).mean(axis=0))
  np.testing.assert_allclose(balance.load_balance_loss(aux["probs_TE"], fraction), expected,
                             rtol=1e-5)


def test_load_balance_loss_is_one_when_uniform_and_gradient_only_through_probs():
  probs = jnp.full((T, E), 1.0 / E)
  fraction = jnp.full((E,), 1.0 / E)
  np.testing.assert_allclose(balance.load_balance_loss(probs, fraction), 1.0, rtol=1e-6)
  grad_fraction = jax.grad(balance.load_balance_loss, argnums=1)(probs, fraction)
  np.testing.assert_array_equal(grad_fraction, np.zeros(E))


def test_importance_loss_is_squared_cv_of_summed_gates():
  logits = _logits(1)
  routed, _ = routing.route_top_k(jnp.asarray(logits), k=2)
  experts, gates = reference.top_k(logits, 2)
  importance = np.bincount(experts.ravel(), weights=gates.ravel(), minlength=E)
  np.testing.assert_allclose(balance.importance_loss(routed),
                             importance.var() / importance.mean() ** 2, rtol=1e-5)


def test_router_z_loss_is_mean_squared_logsumexp_in_float32():
  logits = jnp.asarray(_logits(2) * 3, jnp.bfloat16)
  expected = np.mean(scipy.special.logsumexp(np.asarray(logits, np.float64), axis=-1) ** 2)
  z_loss = balance.router_z_loss(logits)
  assert z_loss.dtype == jnp.float32
  np.testing.assert_allclose(z_loss, expected, rtol=1e-5)


def test_update_bias_moves_towards_mean_load():
  bias = jnp.array([0.0, 1.0, -1.0, 0.0])
  load = jnp.array([10.0, 2.0, 5.0, 3.0])
  np.testing.assert_allclose(balance.update_bias(bias, load, 0.5), [-0.5, 1.5, -1.0, 0.5])


def test_aux_loss_free_bias_reduces_imbalance_without_gradient_into_bias():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(256, 8)) + np.linspace(2.0, 0.0, 8), jnp.float32)
  bias = jnp.zeros(8)

  def imbalance(bias):
    plan, _ = routing.route_top_k(logits, k=2, bias_E=bias)
    load = plan_lib.group_sizes(plan)
    return load, float(jnp.max(load) / jnp.mean(load))

  _, start = imbalance(bias)
  for _ in range(60):
    load, _ = imbalance(bias)
    bias = balance.update_bias(bias, load, 0.02)
  _, end = imbalance(bias)
  assert start > 2.0 and end < 1.3, (start, end)

  def gate_sum(bias):
    plan, _ = routing.route_top_k(logits, k=2, bias_E=bias)
    return jnp.sum(plan.gate_TK ** 2)

  np.testing.assert_array_equal(jax.grad(gate_sum)(bias), np.zeros(8))
  np.testing.assert_array_equal(
      jax.grad(lambda b: jnp.sum(balance.update_bias(b, jnp.arange(8.0), 0.1)))(bias),
      np.zeros(8))
