"""Top-k bottlenecks: forward vs NumPy argsort, straight-through and relaxed gradients by hand and
by finite differences, Gumbel top-k sampling frequencies vs Plackett-Luce probabilities."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.coding import bottleneck

X_BN = np.random.default_rng(0).normal(size=(5, 9)).astype(np.float32)


def numpy_top_k(x_BN, k):
  keep_BK = np.argsort(-x_BN, axis=-1)[:, :k]
  z_BN = np.zeros_like(x_BN)
  np.put_along_axis(z_BN, keep_BK, np.take_along_axis(x_BN, keep_BK, -1), -1)
  return z_BN


@pytest.mark.parametrize("mode", bottleneck.MODES)
def test_forward_keeps_the_numpy_argsort_top_k(mode):
  layer = bottleneck.TopKBottleneck(k=3, mode=mode)
  z_BN, aux = jax.jit(layer.apply)({}, X_BN)  # deterministic: no Gumbel noise
  np.testing.assert_allclose(z_BN, numpy_top_k(X_BN, 3))
  np.testing.assert_allclose(aux["metrics"]["l0"], 3.0)
  np.testing.assert_allclose(aux["metrics"]["kept_energy"],
                             np.sum(numpy_top_k(X_BN, 3) ** 2) / np.sum(X_BN ** 2), rtol=1e-5)


def test_straight_through_gradient_is_the_identity():
  # d/dx sum(c * z) = c for every unit, kept or not (the documented estimator).
  x = jnp.array([[3.0, 1.0, 2.0]])
  c = jnp.array([[1.0, 2.0, 3.0]])
  grad = jax.jit(jax.grad(lambda x: jnp.sum(c * bottleneck.straight_through_top_k(x, 1))))(x)
  np.testing.assert_allclose(grad, [[1.0, 2.0, 3.0]])


def numpy_relaxed_mask(s, k, t):
  """Xie & Ermon's successive softmax in float64."""
  mask, a = np.zeros_like(s), s.copy()
  for _ in range(k):
    p = np.exp((a - a.max()) / t)
    p /= p.sum()
    mask, a = mask + p, a + np.log1p(-p)
  return mask


def test_gumbel_gradient_is_the_relaxed_mask_formula_by_finite_differences():
  # z = x * (m + r - sg(r)): d/dx sum(c * z) = c m + J_r^T (c x), J_r by central differences.
  x = np.array([0.9, -0.2, 0.4, 1.3, 0.1])
  c = np.array([0.5, -1.0, 2.0, 0.3, 1.5])
  k, t = 2, 0.7
  eps = 1e-6
  jac = np.stack([(numpy_relaxed_mask(x + eps * e, k, t) - numpy_relaxed_mask(x - eps * e, k, t))
                  / (2 * eps) for e in np.eye(5)], axis=1)  # jac[i, j] = dr_i / dx_j
  hard = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
  expected = c * hard + jac.T @ (c * x)

  def loss(x):
    return jnp.sum(c * bottleneck.gumbel_top_k(x, k, t))  # key=None: no noise

  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x.astype(np.float32)), expected,
                             rtol=1e-4, atol=1e-5)
  r = jax.jit(bottleneck.relaxed_top_k_mask, static_argnums=(1, 2))(x.astype(np.float32), k, t)
  np.testing.assert_allclose(r, numpy_relaxed_mask(x, k, t), rtol=1e-5)


def test_gumbel_top_k_samples_sets_with_plackett_luce_probabilities():
  scores = np.array([1.0, 0.2, -0.5, 0.5], np.float32)
  num_samples = 40_000
  sample = jax.jit(lambda key: bottleneck.gumbel_top_k(
      jnp.broadcast_to(scores, (num_samples, 4)), 2, 1.0, key))
  kept_SN = np.asarray(sample(jax.random.PRNGKey(0))) != 0
  assert np.all(kept_SN.sum(-1) == 2)
  p = np.exp(scores) / np.exp(scores).sum()
  for i, j in itertools.combinations(range(4), 2):
    # P({i, j}) = P(i first, then j) + P(j first, then i), drawn without replacement from p.
    expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
    observed = np.mean(kept_SN[:, i] & kept_SN[:, j])
    assert abs(observed - expected) < 4.5 * np.sqrt(expected * (1 - expected) / num_samples)


def test_gumbel_mode_draws_from_the_noise_stream_when_training():
  layer = bottleneck.TopKBottleneck(k=3, mode="gumbel", temperature=0.5)
  apply = jax.jit(lambda key: layer.apply({}, X_BN, deterministic=False, rngs={"noise": key}))
  z_a, _ = apply(jax.random.PRNGKey(1))
  z_b, _ = apply(jax.random.PRNGKey(2))
  assert np.all(np.count_nonzero(np.asarray(z_a), axis=-1) == 3)
  assert not np.array_equal(z_a != 0, z_b != 0)
  np.testing.assert_array_equal(np.asarray(z_a)[z_a != 0], X_BN[np.asarray(z_a) != 0])


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 10}, "k=10"), ({"mode": "soft"}, "mode='soft'"), ({"temperature": 0.0}, "temperature")])
def test_bad_arguments_raise(kwargs, match):
  layer = bottleneck.TopKBottleneck(**{"k": 3, "mode": "gumbel", **kwargs})
  with pytest.raises(ValueError, match=match):
    layer.apply({}, X_BN)
