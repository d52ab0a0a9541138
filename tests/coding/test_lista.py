"""ISTA / IHT / LISTA against NumPy iterations, and the thresholds against brute-force proxes."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.coding import lista

RNG = np.random.default_rng(0)
DICT_DN = RNG.normal(size=(6, 10)).astype(np.float32)
Y_BD = RNG.normal(size=(3, 6)).astype(np.float32)
LAM = 0.3
NUM_ITERS = 7


def numpy_ista(y_BD, d_DN, lam, num_iters, penalty):
  """Proximal gradient in float64 with step 1/L, L = ||D||_2^2 (soft or hard threshold)."""
  y_BD, d_DN = y_BD.astype(np.float64), d_DN.astype(np.float64)
  step = 1 / np.linalg.norm(d_DN, 2) ** 2
  z_BN = np.zeros((y_BD.shape[0], d_DN.shape[1]))
  for _ in range(num_iters):
    u_BN = z_BN - step * (z_BN @ d_DN.T - y_BD) @ d_DN
    if penalty == "l1":
      z_BN = np.sign(u_BN) * np.maximum(np.abs(u_BN) - step * lam, 0)
    else:
      z_BN = np.where(np.abs(u_BN) > np.sqrt(2 * step * lam), u_BN, 0)
  return z_BN


@pytest.mark.parametrize("penalty, tied", [("l1", False), ("l0", True)])
def test_lista_with_the_analytic_step_and_threshold_equals_numpy_ista(penalty, tied):
  expected_BN = numpy_ista(Y_BD, DICT_DN, LAM, NUM_ITERS, penalty)
  assert 0 < np.count_nonzero(expected_BN) < expected_BN.size  # the threshold bites
  step = 1 / np.linalg.norm(DICT_DN, 2) ** 2
  ista = jax.jit(lista.ista, static_argnums=(4, 5))
  np.testing.assert_allclose(ista(Y_BD, DICT_DN, LAM, step, NUM_ITERS, penalty), expected_BN,
                             atol=1e-5)
  model = lista.LISTA(num_features=10, num_iters=NUM_ITERS, penalty=penalty, tied=tied)

  @jax.jit
  def codes(d_DN, y_BD):
    return model.apply({"params": lista.lista_params(d_DN, LAM, NUM_ITERS, tied)}, y_BD)

  z_BN, aux = codes(DICT_DN, Y_BD)
  np.testing.assert_allclose(z_BN, expected_BN, atol=1e-5)
  np.testing.assert_allclose(aux["metrics"]["l0"], np.count_nonzero(expected_BN) / 3)
  np.testing.assert_allclose(aux["metrics"]["sparsity"], np.mean(expected_BN == 0), rtol=1e-6)


def grid_prox(y, lam, penalty_fn):
  """argmin_z 0.5 (z - y)^2 + lam penalty(z): a grid of step 1e-3 on [-5, 5] (holding 0), then
  one of step 1e-6 around its best point."""
  objective = lambda z: 0.5 * (z - y) ** 2 + lam * penalty_fn(z)
  coarse = np.linspace(-5, 5, 10_001)
  best = coarse[np.argmin(objective(coarse))]
  fine = np.concatenate([[0.0], best + np.linspace(-2e-3, 2e-3, 4_001)])
  return fine[np.argmin(objective(fine))]


@pytest.mark.parametrize("name, penalty_fn, cut", [
    ("soft_threshold", np.abs, lambda lam: lam),
    ("hard_threshold", lambda z: (z != 0).astype(float), lambda lam: np.sqrt(2 * lam)),
    ("half_threshold", lambda z: np.sqrt(np.abs(z)),
     lambda lam: 54 ** (1 / 3) / 4 * (2 * lam) ** (2 / 3)),
])
def test_thresholds_are_the_brute_force_prox(name, penalty_fn, cut):
  lam = 0.7
  y = np.linspace(-4, 4, 81)
  y = y[np.abs(np.abs(y) - cut(lam)) > 1e-3]  # at the cut of l0 / l_half two minimisers tie
  expected = np.array([grid_prox(v, lam, penalty_fn) for v in y])
  got = np.asarray(jax.jit(getattr(lista, name))(y.astype(np.float32), lam))
  np.testing.assert_allclose(got, expected, atol=2e-5)
  assert np.count_nonzero(expected == 0) >= 4  # the zero branch is exercised too


def test_half_threshold_gradient_is_finite_everywhere():
  grad = jax.jit(jax.grad(lambda x: lista.half_threshold(x, 0.7).sum()))(np.linspace(-3, 3, 13))
  assert np.all(np.isfinite(grad))


def test_lista_init_shapes_and_learned_thresholds_get_gradients():
  model = lista.LISTA(num_features=10, num_iters=2, penalty="l1", lam=0.05)

  @jax.jit
  def init_and_grad(key):
    params = nn.unbox(model.init(key, Y_BD)["params"])
    return params, jax.grad(lambda p: (model.apply({"params": p}, Y_BD)[0] ** 2).sum())(params)

  params, grads = init_and_grad(jax.random.PRNGKey(0))
  assert jax.tree.map(np.shape, params) == {"w_e": (2, 6, 10), "s": (2, 10, 10), "theta": (2,)}
  # ISTA's start: W_i = D^T / L and S_i = I - D^T D / L, so S = I - L W^T W.
  step = float(params["theta"][0]) / 0.05
  np.testing.assert_allclose(params["s"][0], np.eye(10) - params["w_e"][0].T @ params["w_e"][0]
                             / step, atol=1e-5)
  assert np.all(np.asarray(grads["theta"]) < 0)  # a larger l1 threshold shrinks the codes


@pytest.mark.parametrize("kwargs, match", [
    ({"penalty": "l2"}, "penalty='l2'"), ({"num_iters": 0}, "num_iters=0")])
def test_bad_arguments_raise(kwargs, match):
  args = {"penalty": "l1", "num_iters": 2, **kwargs}
  with pytest.raises(ValueError, match=match):
    lista.ista(Y_BD, DICT_DN, LAM, 0.1, args["num_iters"], args["penalty"])
