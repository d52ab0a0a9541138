"""Balanced assignment against scipy's linear_sum_assignment; Sinkhorn against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.moe import assignment
from tests.moe import reference

_solve = jax.jit(assignment.balanced_assignment, static_argnames="num_sinkhorn_iters")


def _scores(seed, num_tokens, num_experts, scale=1.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=(num_tokens, num_experts))).astype(np.float32)


def _total(scores, expert_T):
  return scores[np.arange(scores.shape[0]), expert_T].sum()


@pytest.mark.parametrize("num_tokens,num_experts,num_sinkhorn_iters", [
    (12, 1, 50), (12, 3, 50), (24, 8, 50), (40, 5, 50), (24, 8, 0), (40, 5, 0)])
def test_exactly_capacity_per_expert_and_optimal_total(num_tokens, num_experts,
                                                       num_sinkhorn_iters):
  capacity = num_tokens // num_experts
  for seed, scale in enumerate([1.0, 0.01, 30.0]):
    scores = _scores(seed, num_tokens, num_experts, scale)
    expert_T = np.asarray(_solve(jnp.asarray(scores), num_sinkhorn_iters=num_sinkhorn_iters))
    assert expert_T.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(expert_T, minlength=num_experts),
                                  np.full(num_experts, capacity))
    best = reference.balanced_optimum(scores, capacity)
    # Optimal up to float32 rounding, far inside the 1% a heuristic rounding would need.
    np.testing.assert_allclose(_total(scores, expert_T), best, rtol=1e-5, atol=1e-5 * scale)


def test_ties_and_a_collapsed_router_still_fill_every_expert_exactly():
  for scores in [np.zeros((12, 3), np.float32),
                 np.tile(np.array([[5.0, 1.0, 0.0]], np.float32), (12, 1))]:
    expert_T = np.asarray(_solve(jnp.asarray(scores)))
    np.testing.assert_array_equal(np.bincount(expert_T, minlength=3), [4, 4, 4])
    assert _total(scores, expert_T) == reference.balanced_optimum(scores, 4)


def test_vmaps_over_groups_and_blocks_gradients():
  scores = jnp.asarray(_scores(3, 24, 3).reshape(2, 12, 3))
  batched = jax.jit(jax.vmap(assignment.balanced_assignment))(scores)
  for group in range(2):
    np.testing.assert_array_equal(batched[group], _solve(scores[group]))

  def picked_first_column(s):
    return jnp.sum(jnp.where(assignment.balanced_assignment(s) == 0, s[:, 0], 0.0))

  grad = jax.jit(jax.grad(picked_first_column))(scores[0])
  np.testing.assert_array_equal(grad[:, 0], np.asarray(_solve(scores[0]) == 0, np.float32))
  np.testing.assert_array_equal(grad[:, 1:], np.zeros((12, 2)))


@pytest.mark.parametrize("num_iters", [1, 7])
def test_sinkhorn_prices_match_numpy_scaling_iterations(num_iters):
  scores = _scores(4, 12, 3)
  temperature = 0.5
  prices = assignment.sinkhorn_prices(jnp.asarray(scores), 4, temperature=temperature,
                                      num_iters=num_iters)
  scale = temperature * np.std(scores.astype(np.float64))
  log_v = reference.sinkhorn_log_v(scores / scale, 4, num_iters)
  np.testing.assert_allclose(prices, -scale * log_v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,kwargs,message", [
    ((13, 4), {}, "num_tokens must be a multiple of num_experts=4 for balanced assignment, got 13"),
    ((12, 4), {"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ((12, 4), {"num_sinkhorn_iters": -1}, "num_sinkhorn_iters must be >= 0, got -1"),
])
def test_argument_errors(shape, kwargs, message):
  with pytest.raises(ValueError, match=message):
    assignment.balanced_assignment(jnp.zeros(shape), **kwargs)
