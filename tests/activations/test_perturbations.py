"""Truncated power iteration against the SVD of the explicit Jacobian and a hand-worked case."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.activations import perturbations
from sparsejax.sites import Site


def mlp(params, x_N):
  w1, w2 = params
  return jnp.tanh(x_N @ w1) @ w2


@pytest.fixture(scope="module")
def network():
  rng = np.random.default_rng(0)
  params = (rng.normal(size=(6, 5)).astype(np.float32) / 2,
            rng.normal(size=(5, 4)).astype(np.float32))
  return params, rng.normal(size=(3, 6)).astype(np.float32)


def explicit_jacobian(params, x_BN):
  batch = lambda v: jax.vmap(lambda x: mlp(params, x + v))(x_BN)
  jac = jax.jit(jax.jacobian(batch))(jnp.zeros(6))
  return np.asarray(jac).reshape(-1, 6).astype(np.float64)


def test_dense_p2_q2_gives_the_top_right_singular_vector(network):
  params, x_BN = network
  v, sigma = jax.jit(lambda x: perturbations.input_perturbation(
      lambda xb: mlp(params, xb), x, num_iters=200))(x_BN)
  _, s, vt = np.linalg.svd(explicit_jacobian(params, x_BN))
  assert s[1] / s[0] < 0.9  # a gap the iterations resolve
  assert abs(float(np.dot(v, vt[0]))) == pytest.approx(1.0, abs=1e-4)
  assert float(sigma) == pytest.approx(s[0], rel=1e-4)


def test_truncation_keeps_exactly_k_entries_and_p_inf_is_a_sign_vector(network):
  params, x_BN = network
  run = jax.jit(lambda x, p: perturbations.input_perturbation(
      lambda xb: mlp(params, xb), x, p=p, k=3, num_iters=30), static_argnums=1)
  v, sigma = run(x_BN, 2.0)
  assert int(np.count_nonzero(v)) == 3 and float(np.linalg.norm(v)) == pytest.approx(1.0)
  jac = explicit_jacobian(params, x_BN)
  assert float(sigma) == pytest.approx(np.linalg.norm(jac @ v), rel=1e-4)
  # The best 3-sparse unit vector on each support is the top singular vector of J's columns.
  best = max(np.linalg.svd(jac[:, list(c)], compute_uv=False)[0]
             for c in itertools.combinations(range(6), 3))
  assert float(sigma) <= best + 1e-4 and float(sigma) >= 0.9 * best
  v_inf, _ = run(x_BN, np.inf)
  np.testing.assert_array_equal(np.sort(np.abs(v_inf)), [0, 0, 0, 1, 1, 1])


def test_one_truncated_step_by_hand():
  # J = diag(4, 3, 2, 1), v0 = ones: J^T J v0 = (16, 9, 4, 1), keep 2 -> (16, 9, 0, 0) / sqrt(337).
  linear = lambda v: v * jnp.array([4.0, 3.0, 2.0, 1.0])
  step = jax.jit(lambda n: perturbations.power_iteration(linear, jnp.zeros(4), k=2, num_iters=n,
                                                         init=jnp.ones(4)), static_argnums=0)
  v, sigma = step(1)
  np.testing.assert_allclose(v, np.array([16, 9, 0, 0]) / np.sqrt(337), rtol=1e-6)
  assert float(sigma) == pytest.approx(np.sqrt(16 * 256 + 9 * 81) / np.sqrt(337), rel=1e-6)
  v, sigma = step(60)
  np.testing.assert_allclose(v, [1, 0, 0, 0], atol=1e-6)
  assert float(sigma) == pytest.approx(4.0, rel=1e-6)
  with pytest.raises(ValueError, match="k=5"):
    perturbations.power_iteration(linear, jnp.zeros(4), k=5)
  with pytest.raises(ValueError, match="q=inf"):
    perturbations.power_iteration(linear, jnp.zeros(4), q=np.inf)


class Chain(nn.Module):
  """Sites "a" = x W1 and "b" = tanh(a) W2, per position."""

  @nn.compact
  def __call__(self, x_BTD):
    a_BTD = Site(name="a")(nn.Dense(4, use_bias=False)(x_BTD))
    return Site(name="b")(nn.Dense(3, use_bias=False)(jnp.tanh(a_BTD)))


def test_site_perturbation_matches_the_svd_of_the_site_jacobian():
  model = Chain()
  x_BTD = np.random.default_rng(2).normal(size=(2, 3, 5)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(1), x_BTD)
  v, sigma = jax.jit(lambda x: perturbations.site_perturbation(
      model, variables, x, "a", "b", num_iters=200))(x_BTD)
  w1, w2 = (np.asarray(variables["params"][n]["kernel"], np.float64)
            for n in ("Dense_0", "Dense_1"))
  a_BTD = x_BTD @ w1
  # d b_bt / d v = W2^T diag(1 - tanh(a_bt)^2), stacked over (b, t).
  jac = np.concatenate([w2.T * (1 - np.tanh(a) ** 2) for a in a_BTD.reshape(-1, 4)])
  _, s, vt = np.linalg.svd(jac)
  assert abs(float(np.dot(v, vt[0]))) == pytest.approx(1.0, abs=1e-3)
  assert float(sigma) == pytest.approx(s[0], rel=1e-4)
  with pytest.raises(ValueError, match="must come before"):
    perturbations.site_perturbation(model, variables, x_BTD, "b", "a")
