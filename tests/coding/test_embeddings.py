"""Binarised top-k codes: exactly k ones at NumPy's top-k, sparse overlap vs dense dot products,
the straight-through gradient by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.coding import embeddings

RNG = np.random.default_rng(0)
X_BD = RNG.normal(size=(6, 4)).astype(np.float32)
K = 3
LAYER = embeddings.BinarisedEmbedding(num_features=32, k=K)


def init_params():
  return nn.unbox(jax.jit(LAYER.init)(jax.random.PRNGKey(0), X_BD))


def test_codes_hold_exactly_k_ones_at_the_numpy_top_k_and_sparse_indices_match():
  variables = init_params()
  w_DN, b_N = variables["params"]["w"], variables["params"]["b"]
  apply = jax.jit(LAYER.apply, static_argnames="sparse")
  code_BN, aux = apply(variables, X_BD)
  idx_BK, _ = apply(variables, X_BD, sparse=True)
  top_BK = np.argsort(-(X_BD @ np.asarray(w_DN) + np.asarray(b_N)), axis=-1)[:, :K]
  expected_BN = np.zeros((6, 32), np.float32)
  np.put_along_axis(expected_BN, top_BK, 1.0, axis=-1)
  np.testing.assert_array_equal(code_BN, expected_BN)  # exact zeros and ones
  np.testing.assert_array_equal(np.sort(idx_BK, -1), np.sort(top_BK, -1))
  assert idx_BK.dtype == jnp.int32
  counts_N = np.bincount(top_BK.ravel(), minlength=32)
  np.testing.assert_allclose(aux["metrics"]["active_fraction"], np.mean(counts_N > 0))
  np.testing.assert_allclose(aux["metrics"]["max_feature_rate"], counts_N.max() / 6)


def test_code_overlap_equals_the_dense_dot_product():
  assert int(embeddings.code_overlap(jnp.array([1, 5, 7]), jnp.array([7, 2, 1]))) == 2
  idx_QK = np.stack([RNG.choice(12, 4, replace=False) for _ in range(5)])
  idx_MK = np.stack([RNG.choice(12, 4, replace=False) for _ in range(7)])
  dense_QN, dense_MN = np.zeros((5, 12)), np.zeros((7, 12))
  np.put_along_axis(dense_QN, idx_QK, 1.0, -1)
  np.put_along_axis(dense_MN, idx_MK, 1.0, -1)
  overlap_QM = jax.jit(embeddings.code_overlap)(idx_QK[:, None], idx_MK[None])
  np.testing.assert_array_equal(overlap_QM, dense_QN @ dense_MN.T)


def test_straight_through_gradient_by_hand():
  # code = m + s - sg(s), s = x W + b: d/dW sum(c * code) = x^T c, d/db = sum_rows c,
  # d/dx = c W^T.
  params = init_params()["params"]
  c_BN = RNG.normal(size=(6, 32)).astype(np.float32)

  def loss(w_DN, b_N, x_BD):
    return jnp.sum(c_BN * embeddings.binary_code(x_BD, w_DN, b_N, K)[0])

  d_w, d_b, d_x = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params["w"], params["b"], X_BD)
  np.testing.assert_allclose(d_w, X_BD.T @ c_BN, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_b, c_BN.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_x, c_BN @ np.asarray(params["w"]).T, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="k=33"):
    embeddings.BinarisedEmbedding(num_features=32, k=33).init(jax.random.PRNGKey(0), X_BD)
  with pytest.raises(ValueError, match="same k"):
    embeddings.code_overlap(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32))
