"""top_k_blocked against NumPy sorting; topk_encode against the dense autodiff of lax.top_k."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops import top_k_blocked, topk_encode
from sparsejax.ops import topk as topk_module


@pytest.mark.parametrize("num_cols, k", [(256, 4), (130, 3), (64, 5)])  # blocked; two fallbacks
def test_top_k_blocked_matches_numpy_sort(num_cols, k):
  scores_TN = np.random.default_rng(num_cols).normal(size=(9, num_cols)).astype(np.float32)
  vals_TK, idx_TK = top_k_blocked(jnp.asarray(scores_TN), k)
  np.testing.assert_array_equal(vals_TK, -np.sort(-scores_TN, axis=1)[:, :k])
  np.testing.assert_array_equal(np.take_along_axis(scores_TN, np.asarray(idx_TK), 1), vals_TK)


def test_top_k_blocked_with_ties_returns_k_distinct_columns_holding_the_top_values():
  scores_TN = np.random.default_rng(0).integers(0, 4, size=(16, 512)).astype(np.float32)
  vals_TK, idx_TK = top_k_blocked(jnp.asarray(scores_TN), 8)
  np.testing.assert_array_equal(vals_TK, -np.sort(-scores_TN, axis=1)[:, :8])
  np.testing.assert_array_equal(np.take_along_axis(scores_TN, np.asarray(idx_TK), 1), vals_TK)
  assert all(len(set(row)) == 8 for row in np.asarray(idx_TK).tolist())


def _inputs(num_tokens=12, width=6, num_latents=320, seed=0):
  rng = np.random.default_rng(seed)
  x_TD = rng.normal(size=(num_tokens, width)).astype(np.float32)
  w_DN = rng.normal(size=(width, num_latents)).astype(np.float32) / np.sqrt(width)
  b_N = rng.normal(size=num_latents).astype(np.float32) * 0.5
  return x_TD, w_DN, b_N


def _scatter_TN(vals_TK, idx_TK, num_latents):
  rows_T1 = jnp.arange(vals_TK.shape[0])[:, None]
  return jnp.zeros((vals_TK.shape[0], num_latents), vals_TK.dtype).at[rows_T1, idx_TK].set(vals_TK)


def _dense_acts(x_TD, w_DN, b_N, k):
  """ReLU(x W + b) times the 0/1 mask of lax.top_k's positions (the mask is not differentiated)."""
  relu_TN = jax.nn.relu(x_TD @ w_DN + b_N)
  _, idx_TK = jax.lax.top_k(jax.lax.stop_gradient(relu_TN), k)
  return relu_TN * _scatter_TN(jnp.ones(idx_TK.shape), idx_TK, w_DN.shape[1])


def test_topk_encode_values_match_numpy_top_k_of_relu():
  x_TD, w_DN, b_N = _inputs()
  vals_TK, idx_TK = topk_encode(x_TD, w_DN, b_N, 5)
  relu_TN = np.maximum(x_TD.astype(np.float64) @ w_DN + b_N, 0)
  np.testing.assert_allclose(vals_TK, -np.sort(-relu_TN, axis=1)[:, :5], rtol=1e-5, atol=1e-6)
  expected_TN = np.where(relu_TN >= np.sort(relu_TN, axis=1)[:, -5:-4], relu_TN, 0)
  np.testing.assert_allclose(_scatter_TN(vals_TK, idx_TK, 320), expected_TN, rtol=1e-5, atol=1e-6)
  assert idx_TK.dtype == jnp.int32


@pytest.mark.parametrize("chunk_entries", [2**20, 5 * 320])  # one chunk; 3 chunks, the last padded
def test_topk_encode_gradients_match_dense_autodiff(chunk_entries, monkeypatch):
  monkeypatch.setattr(topk_module, "_CHUNK_ENTRIES", chunk_entries)
  x_TD, w_DN, b_N = _inputs()
  cot_TN = np.random.default_rng(1).normal(size=(12, 320)).astype(np.float32)

  def loss(acts_fn):
    return lambda x, w, b: jnp.sum(jnp.sin(acts_fn(x, w, b)) * cot_TN)

  sparse = lambda x, w, b: _scatter_TN(*topk_encode(x, w, b, 5), 320)
  got = jax.jit(jax.value_and_grad(loss(sparse), (0, 1, 2)))(x_TD, w_DN, b_N)
  want = jax.value_and_grad(loss(lambda x, w, b: _dense_acts(x, w, b, 5)), (0, 1, 2))(
      x_TD, w_DN, b_N)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_topk_encode_with_fewer_than_k_positive_scores_has_zero_gradient_at_zeros():
  x_TD, w_DN, b_N = _inputs(num_tokens=4)
  b_N = b_N - 10.0  # every score negative: all vals are 0 and nothing flows back
  vals_TK, _ = topk_encode(x_TD, w_DN, b_N, 3)
  np.testing.assert_array_equal(vals_TK, 0)
  grads = jax.grad(lambda x, w, b: jnp.sum(topk_encode(x, w, b, 3)[0]), (0, 1, 2))(
      x_TD, w_DN, b_N)
  for g in grads:
    np.testing.assert_array_equal(g, 0)


def test_topk_encode_approx_is_exact_on_cpu():
  x_TD, w_DN, b_N = _inputs()
  exact = topk_encode(x_TD, w_DN, b_N, 4)
  approx = topk_encode(x_TD, w_DN, b_N, 4, approx=True)  # approx_max_k is exact off TPU
  np.testing.assert_allclose(approx[0], exact[0], rtol=1e-6)


@pytest.mark.parametrize("shapes, k, message", [
    (((3, 4), (5, 6), (6,)), 2, r"x_TD \(3, 4\) and w_DN \(5, 6\)"),
    (((3, 4), (4, 6), (5,)), 2, r"b_N shape \(5,\) must be \(6,\)"),
    (((3, 4), (4, 6), (6,)), 0, r"k=0 must be an int in \[1, 6\]"),
    (((3, 4), (4, 6), (6,)), 7, r"k=7 must be an int in \[1, 6\]"),
])
def test_topk_encode_rejects_bad_input(shapes, k, message):
  with pytest.raises(ValueError, match=message):
    topk_encode(*(jnp.zeros(s) for s in shapes), k)


@pytest.mark.parametrize("shape, k, message", [
    ((4,), 2, r"scores_TN must be \[T, N\]; got shape \(4,\)"),
    ((3, 4), 5, r"k=5 must be an int in \[1, 4\]"),
    ((3, 4), 1.0, r"k=1.0 must be an int"),
])
def test_top_k_blocked_rejects_bad_input(shape, k, message):
  with pytest.raises(ValueError, match=message):
    top_k_blocked(jnp.zeros(shape), k)
