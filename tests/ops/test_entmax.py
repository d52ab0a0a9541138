"""sparsemax / entmax15 / entmax_bisect against optax's simplex projection and a float64 NumPy
bisection, values and gradients (finite differences of the NumPy reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.projections import projection_simplex

from sparsejax.ops.entmax import entmax15, entmax_bisect, sparsemax


def np_entmax(z: np.ndarray, alpha: float) -> np.ndarray:
  """alpha-entmax of the 1-D vector z: float64 bisection of tau in
  sum_i [(alpha - 1) z_i - tau]_+^(1 / (alpha - 1)) = 1, then renormalised."""
  x = (alpha - 1) * np.asarray(z, np.float64)
  lo, hi = np.max(x) - 1, np.max(x)
  mass = lambda tau: np.maximum(x - tau, 0) ** (1 / (alpha - 1))
  for _ in range(80):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mass(mid).sum() >= 1 else (lo, mid)
  p = mass(lo)
  return p / p.sum()


def np_entmax_rows(z: np.ndarray, alpha) -> np.ndarray:
  """np_entmax on every row (last axis) of z, with alpha broadcast over the rows."""
  z = np.asarray(z, np.float64)
  alpha = np.broadcast_to(np.asarray(alpha, np.float64), z.shape[:-1])
  out = np.empty_like(z)
  for index in np.ndindex(z.shape[:-1]):
    out[index] = np_entmax(z[index], alpha[index])
  return out


def np_softmax_rows(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def finite_difference(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Central differences of the scalar fn at every entry of x, in float64."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = eps
    grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
  return grad


def _scores(shape, seed=0, scale=2.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * scale


def test_hand_worked_cases():
  # sparsemax([0, .5, 1]): support {.5, 1}, tau = (1.5 - 1) / 2.
  np.testing.assert_allclose(sparsemax(jnp.array([0.0, 0.5, 1.0])), [0, 0.25, 0.75], atol=1e-7)
  # entmax15([1, 0]): x = [.5, 0], (.5 - tau)^2 + tau^2 = 1 gives tau = (1 - sqrt(7)) / 4.
  tau = (1 - np.sqrt(7)) / 4
  np.testing.assert_allclose(entmax15(jnp.array([1.0, 0.0])), [(0.5 - tau)**2, tau**2], atol=1e-6)
  for op in (sparsemax, entmax15, lambda z: entmax_bisect(z, 1.3)):
    np.testing.assert_allclose(op(jnp.full((5,), 3.0)), np.full(5, 0.2), atol=1e-6)
    np.testing.assert_array_equal(op(jnp.array([0.0, 40.0, 1.0])), [0, 1, 0])


def test_sparsemax_is_the_euclidean_projection_onto_the_simplex():
  z = _scores((6, 9))
  want = jax.vmap(projection_simplex)(jnp.asarray(z))
  np.testing.assert_allclose(sparsemax(z), want, atol=1e-6)
  np.testing.assert_allclose(sparsemax(z.T, axis=0), np.asarray(want).T, atol=1e-6)
  assert np.sum(np.asarray(sparsemax(z)) == 0) > 0


@pytest.mark.parametrize("axis", [-1, 1])
def test_entmax15_matches_numpy_bisection(axis):
  z = _scores((3, 7, 5), seed=1)
  moved = np.moveaxis(z, axis, -1)
  want = np.moveaxis(np_entmax_rows(moved, 1.5), -1, axis)
  got = entmax15(z, axis=axis)
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(np.sum(got, axis=axis), 1.0, atol=1e-6)


def test_entmax_bisect_matches_numpy_bisection_with_alpha_per_head():
  z_BHS = _scores((2, 4, 10), seed=2)
  alpha_H = np.array([1.1, 1.5, 1.8, 3.0])
  want = np_entmax_rows(z_BHS, alpha_H)
  np.testing.assert_allclose(entmax_bisect(z_BHS, alpha_H), want, atol=2e-6)
  jitted = jax.jit(entmax_bisect, static_argnames=("axis", "n_iter"))
  np.testing.assert_allclose(jitted(z_BHS, jnp.asarray(alpha_H)), want, atol=2e-6)


def test_bisection_at_alpha_two_and_one_and_a_half_equals_the_exact_maps():
  z = _scores((5, 8), seed=3)
  np.testing.assert_allclose(entmax_bisect(z, 2.0), np_entmax_rows(z, 2.0), atol=2e-6)
  np.testing.assert_allclose(entmax_bisect(z, 2.0), sparsemax(z), atol=2e-6)
  np.testing.assert_allclose(entmax_bisect(z, 1.5), entmax15(z), atol=2e-6)


def test_alpha_towards_one_approaches_softmax():
  z = _scores((4, 8), seed=4, scale=1.0)
  errors = [np.max(np.abs(np.asarray(entmax_bisect(z, alpha)) - np_softmax_rows(z)))
            for alpha in (1.1, 1.01, 1.001)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 2e-3, errors


def _weighted_sum(p_fn, weights):
  return lambda z: np.sum(weights * p_fn(z))


@pytest.mark.parametrize("name, op, alpha", [
    ("sparsemax", sparsemax, 2.0),
    ("entmax15", entmax15, 1.5),
    ("bisect_1.3", lambda z: entmax_bisect(z, 1.3), 1.3),
])
def test_gradient_wrt_z_matches_finite_differences(name, op, alpha):
  z = _scores((3, 6), seed=5)
  weights = _scores((3, 6), seed=6, scale=1.0)
  got = jax.grad(lambda z: jnp.sum(weights * op(z)))(jnp.asarray(z, jnp.float32))
  want = finite_difference(_weighted_sum(lambda z: np_entmax_rows(z, alpha), weights), z)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("alpha_shape", [(), (2, 1), (3,)])
def test_gradient_wrt_alpha_matches_finite_differences(alpha_shape):
  z = _scores((2, 3, 6), seed=7)
  weights = _scores((2, 3, 6), seed=8, scale=1.0)
  alpha = 1.2 + 0.5 * np.asarray(jax.random.uniform(jax.random.key(9), alpha_shape))
  loss = lambda z, alpha: jnp.sum(weights * entmax_bisect(z, alpha))
  got_z, got_alpha = jax.grad(loss, argnums=(0, 1))(jnp.asarray(z, jnp.float32),
                                                     jnp.asarray(alpha, jnp.float32))
  assert got_alpha.shape == alpha_shape
  want_alpha = finite_difference(lambda a: np.sum(weights * np_entmax_rows(z, a)), alpha)
  np.testing.assert_allclose(got_alpha, want_alpha, rtol=1e-3, atol=2e-5)
  want_z = finite_difference(_weighted_sum(lambda z: np_entmax_rows(z, alpha), weights), z)
  np.testing.assert_allclose(got_z, want_z, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("name, op, alpha", [
    ("sparsemax", sparsemax, 2.0),
    ("entmax15", entmax15, 1.5),
    ("bisect_1.2", lambda z: entmax_bisect(z, 1.2), 1.2),
])
def test_masked_entries_get_exactly_zero_probability_and_gradient(name, op, alpha):
  z = _scores((3, 7), seed=10, scale=0.3)  # small scores: dense support among finite entries
  masked = np.array([False, True, False, False, True, True, False])
  z_masked = np.where(masked, -np.inf, z)
  p = np.asarray(op(z_masked))
  assert np.all(p[:, masked] == 0), name
  np.testing.assert_allclose(p[:, ~masked], np_entmax_rows(z[:, ~masked], alpha), atol=2e-6)
  weights = _scores((3, 7), seed=11, scale=1.0)
  grad = np.asarray(jax.grad(lambda z: jnp.sum(weights * op(z)))(jnp.asarray(z_masked)))
  assert np.all(grad[:, masked] == 0) and np.all(np.isfinite(grad)), name


def test_bfloat16_inputs_are_computed_in_float32_and_returned_in_bfloat16():
  z = jnp.asarray(_scores((2, 5), seed=12), jnp.bfloat16)
  want = np_entmax_rows(np.asarray(z, np.float32), 1.5)
  for p in (entmax15(z), entmax_bisect(z, 1.5)):
    assert p.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(p, np.float32), want, atol=4e-3)


@pytest.mark.parametrize("call, message", [
    (lambda z: entmax_bisect(z, 1.0), "alpha=1.0"),
    (lambda z: entmax_bisect(z, np.array([1.5, 0.5, 1.5])), "alpha="),
    (lambda z: entmax_bisect(z, np.ones((4,)) * 1.5), "alpha of shape (4,)"),
    (lambda z: entmax_bisect(z, 1.5, n_iter=0), "n_iter=0"),
    (lambda z: sparsemax(z, axis=2), "axis=2"),
    (lambda z: entmax15(z, axis=-3), "axis=-3"),
])
def test_bad_arguments_raise_a_value_error_naming_them(call, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    call(jnp.zeros((3, 5)))


def test_entmax_bisect_takes_a_concrete_alpha_closed_over_inside_a_loop_body():
  z_TS = jnp.asarray([[0.3, 1.2, -0.5, 0.9], [2.0, 0.1, 0.4, -1.0]], jnp.float32)
  alpha = jnp.float32(1.5)
  looped = jax.lax.fori_loop(0, 1, lambda _, z: entmax_bisect(z, alpha), z_TS)
  np.testing.assert_allclose(looped, entmax15(z_TS), atol=1e-6)
