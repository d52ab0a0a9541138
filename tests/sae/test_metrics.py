"""SAE metrics against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sae import metrics


def test_l0_counts_nonzeros_per_token_including_negative_values():
  acts_TN = jnp.array([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 0.0]])
  np.testing.assert_allclose(metrics.l0(acts_TN), 5 / 3, rtol=1e-6)


def test_fvu_and_explained_variance_hand_case():
  x_TD = jnp.array([[1.0, 0.0], [3.0, 2.0]])  # mean [2, 1]; sum of squared deviations 4
  x_hat_TD = jnp.array([[1.0, 1.0], [2.0, 2.0]])  # squared error 0 + 1 + 1 + 0 = 2
  np.testing.assert_allclose(metrics.fvu(x_hat_TD, x_TD), 0.5, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(metrics.explained_variance)(x_hat_TD, x_TD), 0.5, rtol=1e-6)


def test_explained_variance_is_zero_for_the_mean_and_one_for_a_perfect_reconstruction():
  x_TD = jax.random.normal(jax.random.PRNGKey(0), (9, 4)) * 3.0 + 1.0
  mean_TD = jnp.broadcast_to(jnp.mean(x_TD, axis=0), x_TD.shape)
  np.testing.assert_allclose(metrics.explained_variance(mean_TD, x_TD), 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics.explained_variance(x_TD, x_TD), 1.0, atol=1e-7)


def test_cosine_similarity_hand_case_and_zero_token():
  x_TD = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  x_hat_TD = jnp.array([[1.0, 1.0], [0.0, -3.0]])  # cosines 1/sqrt(2) and -1
  np.testing.assert_allclose(metrics.cosine_similarity(x_hat_TD, x_TD),
                             (1 / math.sqrt(2) - 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics.cosine_similarity(jnp.ones((1, 2)), jnp.zeros((1, 2))), 0.0)


def test_relative_reconstruction_bias_recovers_a_uniform_scale():
  x_TD = jax.random.normal(jax.random.PRNGKey(1), (6, 5))
  np.testing.assert_allclose(metrics.relative_reconstruction_bias(0.7 * x_TD, x_TD), 0.7,
                             rtol=1e-6)


def test_relative_reconstruction_bias_is_the_argmin_of_the_rescaled_error():
  x_TD = jnp.array([[1.0, 0.0]])
  x_hat_TD = jnp.array([[2.0, 2.0]])  # ||x_hat||^2 = 8, <x_hat, x> = 2: gamma = 4
  gamma = float(metrics.relative_reconstruction_bias(x_hat_TD, x_TD))
  np.testing.assert_allclose(gamma, 4.0, rtol=1e-6)
  grid = np.linspace(1.0, 8.0, 7001)
  errors = [np.sum((np.array([[2.0, 2.0]]) / g - np.array([[1.0, 0.0]])) ** 2) for g in grid]
  assert abs(grid[int(np.argmin(errors))] - gamma) < 2e-3


def test_loss_recovered_hand_cases():
  np.testing.assert_allclose(metrics.ce_loss_recovered(2.0, 2.5, 4.0), 0.75)
  np.testing.assert_allclose(metrics.ce_loss_recovered(2.0, 2.0, 4.0), 1.0)
  np.testing.assert_allclose(metrics.ce_loss_recovered(2.0, 4.0, 4.0), 0.0)
  np.testing.assert_allclose(metrics.kl_recovered(0.1, 0.4), 0.75, rtol=1e-6)


def test_kl_divergence_hand_case_with_a_zero_probability_token():
  logits_p_TV = jnp.array([[0.0, 0.0, -jnp.inf], [1.0, 2.0, 3.0]])
  logits_q_TV = jnp.array([[0.0, math.log(3.0), 0.0], [1.0, 2.0, 3.0]])
  # Token 0: p = (1/2, 1/2, 0), q = (1/5, 3/5, 1/5); token 1: p = q.
  kl_0 = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.6)
  np.testing.assert_allclose(metrics.kl_divergence(logits_p_TV, logits_q_TV), kl_0 / 2,
                             rtol=1e-5)


def test_dead_and_dense_fraction_from_the_latent_state():
  state = {"tokens_since_fired": jnp.array([0.0, 5.0, 10.0, 20.0]),
           "fire_count": jnp.array([0.0, 10.0, 11.0, 50.0]), "tokens": jnp.array(100.0)}
  np.testing.assert_allclose(metrics.dead_fraction(state, dead_after_tokens=10), 0.5)
  np.testing.assert_allclose(metrics.dead_fraction(state), 0.0)  # default window 10 M tokens
  np.testing.assert_allclose(metrics.dense_fraction(state), 0.5)  # 0.11 and 0.5 exceed 0.1
  np.testing.assert_allclose(metrics.dense_fraction(state, dense_above=0.3), 0.25)
  fresh = {"fire_count": jnp.zeros(4), "tokens": jnp.array(0.0)}
  np.testing.assert_allclose(metrics.dense_fraction(fresh), 0.0)


def test_feature_density_histogram_hand_case():
  fire_count_N = jnp.array([0.0, 1.0, 5.0, 50.0, 1000.0, 0.0])  # log10 density -3, -2.3, -1.3, 0
  never, counts = metrics.feature_density_histogram(fire_count_N, jnp.array(1000.0), [-4, -2, 0])
  assert int(never) == 2
  np.testing.assert_array_equal(counts, [2, 2])  # 0 = the last edge goes in the last bucket
  never, counts = jax.jit(metrics.feature_density_histogram, static_argnums=2)(
      fire_count_N, 1000.0, (-2.5, -1.0, -0.5))
  assert int(never) == 2
  np.testing.assert_array_equal(counts, [3, 1])  # -3 below the range, 0 above it


def test_bad_inputs_raise_value_errors_naming_the_argument():
  with pytest.raises(ValueError, match="x_hat_TD and x_TD"):
    metrics.fvu(jnp.zeros((3, 2)), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="acts_TN"):
    metrics.l0(jnp.zeros(5))
  with pytest.raises(ValueError, match="bins"):
    metrics.feature_density_histogram(jnp.zeros(3), 10.0, [0.0, -1.0])
  with pytest.raises(ValueError, match="tokens_since_fired"):
    metrics.dead_fraction({"fire_count": jnp.zeros(3)})
  with pytest.raises(ValueError, match="dead_after_tokens"):
    metrics.dead_fraction({"tokens_since_fired": jnp.zeros(3)}, dead_after_tokens=0)
  with pytest.raises(ValueError, match="dense_above"):
    metrics.dense_fraction({"fire_count": jnp.zeros(3), "tokens": 1.0}, dense_above=1.5)
