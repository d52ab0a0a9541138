"""Tests for sparsejax.sae.training against hand-worked cases, NumPy and SciPy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

from sparsejax.sae import initializers
from sparsejax.sae import training


def test_remove_parallel_is_orthogonal_to_rows_and_removes_only_a_row_multiple():
  rng = np.random.default_rng(0)
  w_ND, u_ND = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  tangent = np.asarray(training.remove_parallel(jnp.asarray(u_ND), jnp.asarray(w_ND)), np.float64)
  np.testing.assert_allclose(np.sum(tangent * w_ND, -1), 0.0, atol=1e-5)
  for w, removed in zip(w_ND, u_ND - tangent):
    assert np.linalg.matrix_rank(np.stack([w, removed]), tol=1e-5) == 1


def test_unit_norm_decoder_update_matches_a_hand_worked_case():
  w = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
  u = jnp.asarray([[0.5, 1.0], [3.0, 0.0]])
  # Row 0: u_perp = (0, 1), W + u_perp = (1, 1) -> (1, 1)/sqrt 2. Row 1: u_perp = (3, 0),
  # W + u_perp = (3, 2) -> (3, 2)/sqrt 13.
  want = np.asarray([[2**-0.5 - 1, 2**-0.5], [3 / 13**0.5, 2 / 13**0.5 - 2]])
  tx = training.unit_norm_decoder()
  params = {"W_dec": w}
  updates, _ = tx.update({"W_dec": u}, tx.init(params), params)
  np.testing.assert_allclose(updates["W_dec"], want, rtol=1e-6)


def _separable_loss(params, a_ND):
  """A loss whose gradient for every param but W_dec does not depend on W_dec."""
  sae = params["model"]["sae"]
  return (jnp.sum(sae["W_dec"] * a_ND) + jnp.sum((sae["b_dec"] - 1.0) ** 2)
          + jnp.sum(params["W_enc"] ** 2))


def _train(tx, params, a_ND, steps=4):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_separable_loss)(params, a_ND)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(params)
  return history


def test_chained_after_adam_rows_stay_unit_norm_and_other_params_follow_adam():
  rng = np.random.default_rng(1)
  params = {"model": {"sae": {"W_dec": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                              "b_dec": jnp.zeros(3)}},
            "W_enc": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
  a_ND = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  constrained = _train(optax.chain(optax.adam(0.1), training.unit_norm_decoder()), params, a_ND)
  plain = _train(optax.adam(0.1), params, a_ND)
  for got, want in zip(constrained, plain):
    np.testing.assert_allclose(np.linalg.norm(got["model"]["sae"]["W_dec"], axis=-1), 1.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(got["model"]["sae"]["b_dec"], want["model"]["sae"]["b_dec"])
    np.testing.assert_array_equal(got["W_enc"], want["W_enc"])
  # The constrained decoder still descends the loss sum(W_dec * A): each row turns towards -A.
  first = np.asarray(constrained[0]["model"]["sae"]["W_dec"])
  last = np.asarray(constrained[-1]["model"]["sae"]["W_dec"])
  assert np.sum(last * a_ND) < np.sum(first * a_ND)


def test_boxed_flax_params_are_matched_by_name():
  w = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
  params = {"params": {"W_dec": nn.Partitioned(w, names=("latent", "embed"))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.chain(optax.sgd(0.5), training.unit_norm_decoder())
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)["params"]["W_dec"]
  assert isinstance(new, nn.Partitioned)
  np.testing.assert_allclose(np.linalg.norm(new.value, axis=-1), 1.0, rtol=1e-6)


def test_unit_norm_decoder_errors():
  tx = training.unit_norm_decoder()
  params = {"W_enc": jnp.ones((2, 3)), "b_enc": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"param_name='W_dec'.*\['W_enc', 'b_enc'\]"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))


def test_geometric_median_minimises_summed_distance_like_scipy():
  rng = np.random.default_rng(3)
  x_TD = np.concatenate([rng.normal(size=(40, 3)), rng.normal(30.0, 1.0, size=(6, 3))])
  objective = lambda y: np.sum(np.linalg.norm(x_TD - y, axis=-1))
  want = optimize.minimize(objective, x_TD.mean(0), method="Nelder-Mead",
                           options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20_000}).x
  got = np.asarray(initializers.geometric_median(jnp.asarray(x_TD, jnp.float32), num_iters=100), np.float64)
  np.testing.assert_allclose(got, want, atol=1e-3)
  assert objective(got) <= objective(want) * (1 + 1e-6)
  assert np.linalg.norm(got - x_TD.mean(0)) > 1.0  # far from the outlier-pulled mean


def test_geometric_median_of_a_symmetric_set_is_its_centre():
  angles = 2 * np.pi * np.arange(6) / 6
  centre = np.asarray([2.0, -1.0])
  hexagon = centre + np.stack([np.cos(angles), np.sin(angles)], -1)
  points = np.concatenate([hexagon, centre + [[5.0, 0.0], [-5.0, 0.0]]])
  np.testing.assert_allclose(initializers.geometric_median(jnp.asarray(points, jnp.float32), num_iters=100), centre,
                             atol=1e-5)


def test_activation_scale_by_hand():
  # Row norms 5, 0, 10: mean 5, D = 2, so s = sqrt(2) / 5.
  x_TD = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
  np.testing.assert_allclose(training.activation_scale(x_TD), 2**0.5 / 5, rtol=1e-6)


def test_scaled_activations_have_mean_norm_sqrt_d():
  x_TD = np.random.default_rng(4).normal(3.0, 2.0, size=(64, 16))
  s = float(training.activation_scale(jnp.asarray(x_TD, jnp.float32)))
  np.testing.assert_allclose(np.mean(np.linalg.norm(s * x_TD, axis=-1)), 4.0, rtol=1e-5)


def test_bad_shapes_are_errors():
  fn = training.activation_scale
  with pytest.raises(ValueError, match=r"x_TD must be a non-empty \[T, D\] array, got shape \(3"):
    fn(jnp.ones(3))
