"""Token / window sparse application against hand cases, NumPy and the naive masked form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.activations import token_sparsity as ts
from sparsejax.models import DenseFFN


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_top_rows(scores_BN, keep):
  """NumPy: each row's `keep` largest scores as a mask (ties to the lower index)."""
  idx = np.argsort(-scores_BN, axis=-1, kind="stable")[:, :keep]
  mask = np.zeros(scores_BN.shape, bool)
  np.put_along_axis(mask, idx, True, axis=-1)
  return mask


def test_token_sparse_apply_hand_case_keeps_row_order():
  x = jnp.array([[[1.0], [2.0], [3.0], [4.0]]])
  scores = jnp.array([[0.1, 5.0, -1.0, 3.0]])  # keeps tokens 1 and 3, in that order
  scale = lambda z: z * jnp.arange(1.0, 3.0)[None, :, None]
  y = jax.jit(ts.token_sparse_apply, static_argnums=(0, 3))(scale, x, scores, 0.5)
  np.testing.assert_array_equal(y[0, :, 0], [1, 2 + 2 * 1, 3, 4 + 4 * 2])


def test_token_sparse_apply_matches_dense_and_masked_forms_and_their_gradients():
  x, w, g = _rand(0, 2, 6, 4), _rand(1, 4, 4), _rand(2, 2, 6, 4)
  scores = _rand(3, 2, 6)
  fn = lambda w: lambda z: jnp.tanh(z @ w)
  mask = _np_top_rows(scores, 2)[..., None]

  def sparse(x, w, keep_fraction):
    return ts.token_sparse_apply(fn(w), x, scores, keep_fraction)

  def masked(x, w):
    return x + jnp.where(mask, fn(w)(x), 0)

  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)

  @jax.jit
  def run(x, w):
    keep_third = lambda x, w: sparse(x, w, 1 / 3)
    return (sparse(x, w, 1.0), keep_third(x, w), jax.grad(loss(keep_third), (0, 1))(x, w),
            jax.grad(loss(masked), (0, 1))(x, w))

  y_all, y, grads, masked_grads = run(x, w)
  np.testing.assert_allclose(y_all, x + np.tanh(x @ w), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.where(mask, 0, y), np.where(mask, 0, x))  # others untouched
  np.testing.assert_allclose(y, np.where(mask, x + np.tanh(x @ w), x), rtol=1e-6, atol=1e-6)
  for got, want in zip(grads, masked_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_windows_partition_score_and_sparse_apply_match_numpy():
  x = _rand(4, 2, 4, 6, 3)  # B=2, 4 x 6 map, C=3; windows of 2 x 2: a 2 x 3 grid
  x[1, 2:4, 2:4] *= 10  # batch element 1: window (1, 1) = window 4 dominates
  expected = np.stack([x[:, r:r + 2, c:c + 2].reshape(2, 4, 3)
                       for r in (0, 2) for c in (0, 2, 4)], axis=1)
  double = lambda windows: 2 * windows

  @jax.jit
  def run(x):
    windows = ts.window_partition(x, 2)
    return (windows, ts.window_merge(windows, 2, 4, 6), ts.window_scores(x, 2),
            ts.select_windows(x, 2, 2), ts.window_sparse_apply(double, x, 2, 1 / 6))

  windows, merged, scores, (kept, idx), y = run(x)
  np.testing.assert_array_equal(windows, expected)
  np.testing.assert_array_equal(merged, x)
  np.testing.assert_allclose(scores, np.linalg.norm(expected, axis=-1).mean(-1), rtol=1e-6)
  top2 = np.sort(np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, :2], axis=-1)
  np.testing.assert_array_equal(idx, top2)
  np.testing.assert_array_equal(kept, np.take_along_axis(expected, top2[..., None, None], 1))
  assert int(np.argmax(scores[1])) == 4
  y_expected = x.copy()
  y_expected[1, 2:4, 2:4] *= 3  # x + 2 x on the one kept window
  best0 = int(np.argmax(scores[0]))
  r, c = 2 * (best0 // 3), 2 * (best0 % 3)
  y_expected[0, r:r + 2, c:c + 2] *= 3
  np.testing.assert_allclose(y, y_expected, rtol=1e-6)


def test_token_sparse_block_wraps_a_contract_layer():
  x = jnp.asarray(_rand(5, 2, 4, 8))
  ffn = DenseFFN(d_model=8, d_ff=16)
  block = ts.TokenSparseBlock(block=ffn, keep_fraction=0.5)

  @jax.jit
  def run(key):
    variables = block.init(key, x)
    return block.apply(variables, x), ffn.apply({"params": variables["params"]["block"]}, x)

  (y, aux), (update, _) = run(jax.random.key(0))
  mask = _np_top_rows(np.linalg.norm(np.asarray(x), axis=-1), 2)[..., None]
  np.testing.assert_allclose(y, np.where(mask, x + update, x), rtol=1e-5, atol=1e-6)
  assert aux == {"losses": {}, "metrics": {"active_fraction": 0.5}}


def test_errors():
  with pytest.raises(ValueError, match="keep_fraction=0; allowed: a fraction in"):
    ts.token_sparse_apply(lambda z: z, jnp.ones((1, 4, 2)), jnp.ones((1, 4)), 0)
  with pytest.raises(ValueError, match="scores_BN shape \\(1, 3\\) must be"):
    ts.select_top(jnp.ones((1, 4, 2)), jnp.ones((1, 3)), 1)
  with pytest.raises(ValueError, match="feature map 4x6 is not a multiple of window=4"):
    ts.window_partition(jnp.ones((1, 4, 6, 2)), 4)
