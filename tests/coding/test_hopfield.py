"""Sparse Hopfield retrieval: softmax retrieval (alpha = 1) and one entmax update vs NumPy with a
bisection entmax; exact one-step retrieval with sparsemax on a hand case."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.coding import hopfield

RNG = np.random.default_rng(0)
MEM_MD = RNG.normal(size=(5, 4)).astype(np.float32)
XI_BQD = RNG.normal(size=(2, 3, 4)).astype(np.float32)


def numpy_entmax(z, alpha, iters=200):
  """alpha-entmax of each row by bisection on tau in float64 (alpha = 1: softmax)."""
  z = np.asarray(z, np.float64)
  if alpha == 1:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  x = (alpha - 1) * z
  lo, hi = x.max(-1, keepdims=True) - 1, x.max(-1, keepdims=True)
  for _ in range(iters):
    tau = (lo + hi) / 2
    heavy = (np.maximum(x - tau, 0) ** (1 / (alpha - 1))).sum(-1, keepdims=True) >= 1
    lo, hi = np.where(heavy, tau, lo), np.where(heavy, hi, tau)
  return np.maximum(x - lo, 0) ** (1 / (alpha - 1))


def numpy_retrieve(xi, mem, beta, alpha, steps):
  for _ in range(steps):
    xi = numpy_entmax(beta * xi @ mem.T, alpha) @ mem
  return xi


def test_alpha_one_is_softmax_retrieval():
  layer = hopfield.SparseHopfield(alpha=1.0, learn_alpha=False, beta=0.8, num_steps=2)
  y_BQD, aux = jax.jit(layer.apply)({}, XI_BQD, MEM_MD)
  np.testing.assert_allclose(y_BQD, numpy_retrieve(XI_BQD, MEM_MD, 0.8, 1, 2), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(aux["metrics"]["attended_fraction"], 1.0)


@pytest.mark.parametrize("alpha", [1.3, 1.5, 2.0])
def test_one_update_matches_a_numpy_bisection_entmax(alpha):
  retrieve = jax.jit(lambda xi, mem: hopfield.hopfield_retrieve(xi, mem, 1.7, alpha))
  y_BQD, p_BQM = retrieve(XI_BQD, MEM_MD)
  expected_p = numpy_entmax(1.7 * XI_BQD @ MEM_MD.T, alpha)
  assert 0 < np.count_nonzero(expected_p) < expected_p.size  # sparse, not one-hot everywhere
  np.testing.assert_allclose(p_BQM, expected_p, atol=2e-6)
  np.testing.assert_allclose(y_BQD, expected_p @ MEM_MD, atol=1e-5)


def test_sparsemax_retrieves_a_well_separated_pattern_exactly_in_one_step():
  # Orthogonal patterns of norm 3: the scores beta X xi of a noisy copy of pattern 1 are
  # ~ (0, 9, 0) up to the noise, a gap > 1, so sparsemax puts all its mass on pattern 1.
  mem_MD = 3.0 * np.eye(3, 4, dtype=np.float32)
  xi_QD = mem_MD[1:2] + np.array([[0.2, -0.3, 0.1, 0.4]], np.float32)
  y_QD, p_QM = jax.jit(hopfield.hopfield_retrieve)(xi_QD, mem_MD, 1.0)
  np.testing.assert_array_equal(p_QM, [[0.0, 1.0, 0.0]])
  np.testing.assert_array_equal(y_QD, mem_MD[1:2])


def test_learned_alpha_and_memory_get_gradients_and_batches_share_the_memory():
  layer = hopfield.SparseHopfield(num_memories=5, alpha=1.5)

  @jax.jit
  def init_apply_grad(key):
    params = nn.unbox(layer.init(key, XI_BQD))["params"]
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, XI_BQD)[0] ** 2))(params)
    return params, layer.apply({"params": params}, XI_BQD), grads

  params, (y_BQD, aux), grads = init_apply_grad(jax.random.PRNGKey(0))
  assert params["memory"].shape == (5, 4)
  np.testing.assert_allclose(aux["metrics"]["alpha"], 1.5)
  expected = numpy_retrieve(XI_BQD, np.asarray(params["memory"]), 0.5, 1.5, 1)  # beta 1/sqrt(4)
  np.testing.assert_allclose(y_BQD, expected, atol=1e-5)
  assert np.isfinite(grads["alpha_logit"]) and grads["alpha_logit"] != 0
  assert np.all(np.isfinite(grads["memory"]))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="num_memories=None"):
    hopfield.SparseHopfield().init(jax.random.PRNGKey(0), XI_BQD)
  with pytest.raises(ValueError, match="alpha=2.0"):
    hopfield.SparseHopfield(num_memories=2, alpha=2.0).init(jax.random.PRNGKey(0), XI_BQD)
  with pytest.raises(ValueError, match="alpha=0.5"):
    hopfield.entmax_weights(jnp.zeros((2, 3)), 0.5)
