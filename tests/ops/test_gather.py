"""gather_decode and its row kernels against the dense decode S @ table, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sparsejax.ops import gather_decode, gather_rows_dot, gather_rows_sum, scatter_rows_add
from sparsejax.ops import gather as gather_module


def _dense_weights(idx_TK, weights_TK, num_rows):
  """The [T, N] matrix S holding `weights` at `idx` (repeats add), built in NumPy."""
  s_TN = np.zeros((idx_TK.shape[0], num_rows), np.float64)
  for t, k in np.ndindex(*idx_TK.shape):
    s_TN[t, idx_TK[t, k]] += weights_TK[t, k]
  return s_TN


def _inputs(num_tokens=7, k=3, num_rows=11, width=10, seed=0):
  rng = np.random.default_rng(seed)
  table_ND = rng.normal(size=(num_rows, width)).astype(np.float32)
  idx_TK = rng.integers(0, num_rows, size=(num_tokens, k)).astype(np.int32)
  idx_TK[0, :2] = 4  # a repeated index in one row
  weights_TK = rng.normal(size=(num_tokens, k)).astype(np.float32)
  return table_ND, idx_TK, weights_TK


@pytest.mark.parametrize("chunk_entries", [2**19, 3 * 3 * 10])  # one chunk; 3, the last padded
def test_row_kernels_match_numpy_dense_products(chunk_entries, monkeypatch):
  monkeypatch.setattr(gather_module, "_CHUNK_ENTRIES", chunk_entries)
  table_ND, idx_TK, weights_TK = _inputs()
  y_TD = np.random.default_rng(1).normal(size=(7, 10)).astype(np.float32)
  s_TN = _dense_weights(idx_TK, weights_TK, 11)
  np.testing.assert_allclose(gather_rows_sum(table_ND, idx_TK, weights_TK), s_TN @ table_ND,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scatter_rows_add(idx_TK, weights_TK, y_TD, 11), s_TN.T @ y_TD,
                             rtol=1e-5, atol=1e-5)
  dots_TK = np.einsum("tkd,td->tk", table_ND[idx_TK], y_TD)
  np.testing.assert_allclose(gather_rows_dot(table_ND, idx_TK, y_TD), dots_TK, rtol=1e-5,
                             atol=1e-5)


def test_out_of_range_indices_are_clamped_forward_and_backward():
  table_ND, _, _ = _inputs()
  idx_TK = np.array([[-3, 20], [10, 0]], np.int32)
  weights_TK = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
  s_TN = _dense_weights(np.clip(idx_TK, 0, 10), weights_TK, 11)
  out_TD = s_TN @ table_ND
  np.testing.assert_allclose(gather_decode(table_ND, idx_TK, weights_TK), out_TD, rtol=1e-5)
  d_table_ND = jax.grad(lambda t: jnp.sum(gather_decode(t, idx_TK, weights_TK) ** 2))(table_ND)
  np.testing.assert_allclose(d_table_ND, s_TN.T @ (2 * out_TD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 9])  # 9 slots: more than one unrolled loop step plus a remainder
def test_gather_decode_values_and_gradients_match_dense_decode(k):
  table_ND, idx_TK, weights_TK = _inputs(k=k)

  def dense_decode(table, weights):
    s_TN = jnp.zeros((idx_TK.shape[0], table.shape[0])).at[
        jnp.arange(idx_TK.shape[0])[:, None], idx_TK].add(weights)
    return s_TN @ table

  want_TD = _dense_weights(idx_TK, weights_TK, 11) @ table_ND
  np.testing.assert_allclose(gather_decode(table_ND, idx_TK, weights_TK), want_TD, rtol=1e-5,
                             atol=1e-5)
  loss = lambda decode: lambda t, w: jnp.sum(jnp.sin(decode(t, w)))
  got = jax.jit(jax.grad(loss(lambda t, w: gather_decode(t, idx_TK, w)), (0, 1)))(
      table_ND, weights_TK)
  want = jax.grad(loss(dense_decode), (0, 1))(table_ND, weights_TK)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_gather_decode_gradient_matches_finite_differences():
  table_ND, idx_TK, weights_TK = _inputs(num_tokens=3, num_rows=5, width=4)
  table_ND, weights_TK = table_ND.astype(np.float64), weights_TK.astype(np.float64)
  with jax.enable_x64():
    check_grads(lambda t, w: gather_decode(t, idx_TK, w), (table_ND, weights_TK), order=1,
                modes=["rev"])


@pytest.mark.parametrize("args, message", [
    ((np.zeros(3), np.zeros((2, 1), np.int32), np.zeros((2, 1))), "table_ND must be"),
    ((np.zeros((3, 2)), np.zeros((2, 1)), np.zeros((2, 1))), "idx_TK must be an integer"),
    ((np.zeros((3, 2)), np.zeros((2, 1), np.int32), np.zeros((2, 2))), "weights_TK shape"),
])
def test_gather_decode_rejects_bad_shapes(args, message):
  with pytest.raises(ValueError, match=message):
    gather_decode(*args)
