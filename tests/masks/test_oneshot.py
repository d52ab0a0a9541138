"""Wanda and SparseGPT one-shot pruning against hand-worked and naive OBS references."""
import numpy as np
import pytest

from sparsejax.masks import oneshot, structures


def _layer(inputs=16, outputs=6, samples=64, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(inputs, inputs)) + 2 * np.eye(inputs)  # correlated inputs
  x = (rng.normal(size=(samples, inputs)) @ mix).astype(np.float32)
  w = rng.normal(size=(inputs, outputs)).astype(np.float32)
  return w, x


def test_wanda_scores_hand_worked_and_comparison_per_output():
  w = np.array([[1.0, -4.0], [-2.0, 1.0], [3.0, 1.0]])
  x = np.array([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # input norms 5, 1, 1
  np.testing.assert_allclose(oneshot.wanda_scores(w, x), [[5, 20], [2, 1], [3, 1]])
  pruned, mask = oneshot.wanda_prune(w, x, density=1 / 3)
  np.testing.assert_array_equal(mask, [[True, True], [False, False], [False, False]])
  np.testing.assert_array_equal(pruned, [[1.0, -4.0], [0, 0], [0, 0]])
  _, mask_nm = oneshot.wanda_prune(np.ones((4, 1)), np.diag([1.0, 3.0, 2.0, 4.0]), n=1, m=2)
  np.testing.assert_array_equal(mask_nm[:, 0], [False, True, False, True])


def _naive_sparsegpt(w_IO, x_NI, density=None, n=None, m=None, dampening=0.01):
  """Row by row sequential OBS with explicit inverses of H restricted to unvisited inputs F.

  Pruned set: unstructured (one block): lowest w_i^2 / [H_F_i^-1]_00 over all outputs, chosen
  up front; N:M: per output, at the start of each group, the m - n lowest of the current w_j^2 /
  [H_F_j^-1]_00. Prune i: w_F -= w_i / [H_F^-1]_00 [H_F^-1]_0,:.
  """
  w = np.asarray(w_IO, np.float64).T.copy()
  x = np.asarray(x_NI, np.float64)
  h = x.T @ x
  h += dampening * np.mean(np.diag(h)) * np.eye(h.shape[0])
  inputs = h.shape[0]
  d = np.array([np.linalg.inv(h[i:, i:])[0, 0] for i in range(inputs)])
  pruned = np.zeros(w.shape, bool)
  if n is None:
    scores = (w**2 / d[None, :]).ravel()
    count = w.size - structures.structure_count("unstructured", w.shape, density)
    pruned.ravel()[np.argsort(scores, kind="stable")[:count]] = True
  for o in range(w.shape[0]):
    for i in range(inputs):
      if n is not None and i % m == 0:
        group = w[o, i:i + m] ** 2 / d[i:i + m]
        pruned[o, i + np.argsort(group, kind="stable")[:m - n]] = True
      if pruned[o, i]:
        h_inv = np.linalg.inv(h[i:, i:])
        w[o, i:] -= w[o, i] / h_inv[0, 0] * h_inv[0, :]
  w[pruned] = 0.0
  return w.T, ~pruned.T


@pytest.mark.parametrize("kw", [{"density": 0.5}, {"n": 2, "m": 4}])
def test_sparsegpt_equals_naive_sequential_obs(kw):
  w, x = _layer(inputs=12, outputs=5, samples=48)
  got_w, got_mask = oneshot.sparsegpt_prune(w, x, blocksize=12, **kw)
  want_w, want_mask = _naive_sparsegpt(w, x, **kw)
  np.testing.assert_array_equal(got_mask, want_mask)
  np.testing.assert_allclose(got_w, want_w, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("kw", [{"density": 0.4}, {"n": 2, "m": 4}])
def test_sparsegpt_beats_magnitude_and_wanda_reconstruction_at_equal_sparsity(kw):
  w, x = _layer(inputs=32, outputs=12, samples=128, seed=1)
  sgpt_w, sgpt_mask = oneshot.sparsegpt_prune(w, x, blocksize=8, **kw)
  wanda_w, _ = oneshot.wanda_prune(w, x, **kw)
  if "n" in kw:
    mag_mask = structures.select("nm", np.abs(w), None, n=2, m=4)
  else:
    mag_mask = structures.select("unstructured", np.abs(w), 0.4)
  assert int(np.sum(sgpt_mask)) == int(np.sum(mag_mask))
  assert np.all(np.asarray(sgpt_w)[~np.asarray(sgpt_mask)] == 0)

  def error(pruned):
    return np.linalg.norm(x @ w - x @ np.asarray(pruned, np.float64))

  assert error(sgpt_w) < 0.8 * error(np.where(mag_mask, w, 0))
  assert error(sgpt_w) < error(wanda_w)


@pytest.mark.parametrize("call, match", [
    (lambda: oneshot.sparsegpt_prune(np.ones((8, 2)), np.ones((4, 8)), n=4, m=2), "N=4, M=2"),
    (lambda: oneshot.sparsegpt_prune(np.ones((8, 2)), np.ones((4, 8)), 1.2), "density"),
    (lambda: oneshot.sparsegpt_prune(np.ones((8, 2)), np.ones((4, 8)), n=2, m=4, blocksize=6),
     "multiple of M"),
    (lambda: oneshot.wanda_prune(np.ones((8, 2)), np.ones((4, 7)), 0.5), "x \\[N, I\\]"),
])
def test_bad_input_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
