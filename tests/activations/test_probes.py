"""k-sparse probes against a brute-force subset search, NumPy Newton iterations and hand labels."""
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.activations import probes
from sparsejax.sites import Site


def numpy_logistic(x_NK, y_N, l2, steps=50):
  """Float64 Newton iterations for sum_n log-loss + l2/2 ||w||^2 (bias not penalised)."""
  x = np.concatenate([x_NK, np.ones((len(x_NK), 1))], 1).astype(np.float64)
  penalty = np.append(np.full(x_NK.shape[1], l2), 0.0)
  theta = np.zeros(x.shape[1])
  for _ in range(steps):
    p = 1 / (1 + np.exp(-x @ theta))
    grad = x.T @ (p - y_N) + penalty * theta
    theta -= np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + np.diag(penalty), grad)
  p = 1 / (1 + np.exp(-x @ theta))
  loss = -np.sum(y_N * np.log(p) + (1 - y_N) * np.log(1 - p)) + l2 / 2 * theta[:-1] @ theta[:-1]
  return theta[:-1], theta[-1], loss


@pytest.fixture(scope="module")
def planted():
  """8 neurons, label = [a_2 - a_5 + noise > 0]: the signal lives in neurons 2 and 5."""
  rng = np.random.default_rng(0)
  acts_NF = rng.normal(size=(200, 8)).astype(np.float32)
  labels_N = (acts_NF[:, 2] - acts_NF[:, 5] + 0.5 * rng.normal(size=200) > 0)
  return acts_NF, labels_N


def test_selection_matches_a_brute_force_search_over_all_pairs(planted):
  acts_NF, labels_N = planted
  probe = probes.fit_sparse_probe(acts_NF, labels_N, 2, l2=0.1)
  losses = {pair: numpy_logistic(acts_NF[:, pair], labels_N, 0.1)[2]
            for pair in itertools.combinations(range(8), 2)}
  best = min(losses, key=losses.get)
  assert best == (2, 5) and sorted(np.asarray(probe.indices_K).tolist()) == list(best)
  w_K, b, _ = numpy_logistic(acts_NF[:, np.asarray(probe.indices_K)], labels_N, 0.1)
  np.testing.assert_allclose(probe.weights_K, w_K, rtol=1e-3)
  np.testing.assert_allclose(probe.bias, b, rtol=1e-3, atol=1e-4)
  logits = acts_NF[:, np.asarray(probe.indices_K)] @ w_K + b
  assert float(probe.accuracy) == pytest.approx(np.mean((logits > 0) == labels_N))
  assert float(probe.accuracy) > 0.85


def test_scores_match_numpy_formulas(planted):
  acts_NF, labels_N = planted
  a, y = acts_NF.astype(np.float64), labels_N
  m1, m0, m = a[y].mean(0), a[~y].mean(0), a.mean(0)
  np.testing.assert_allclose(probes.score_neurons(acts_NF, labels_N, "mean_diff"),
                             np.abs(m1 - m0), rtol=1e-4)
  corr = [abs(np.corrcoef(a[:, f], y)[0, 1]) for f in range(8)]
  np.testing.assert_allclose(probes.score_neurons(acts_NF, labels_N, "correlation"), corr,
                             rtol=1e-4)
  between = y.sum() * (m1 - m) ** 2 + (~y).sum() * (m0 - m) ** 2
  within = ((a[y] - m1) ** 2).sum(0) + ((a[~y] - m0) ** 2).sum(0)
  np.testing.assert_allclose(probes.score_neurons(acts_NF, labels_N, "f_stat"),
                             between / (within / (len(y) - 2)), rtol=1e-3)
  with pytest.raises(ValueError, match="method='t_test'"):
    probes.score_neurons(acts_NF, labels_N, "t_test")
  with pytest.raises(ValueError, match="k=9"):
    probes.select_neurons(np.zeros(8), 9)


def test_byte_labels_by_hand():
  tokens_BT = np.array([list(b"a1 _Z9 ") + [256, 257]])
  np.testing.assert_array_equal(probes.byte_labels(tokens_BT, "digit")[0],
                                [0, 1, 0, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(probes.byte_labels(tokens_BT, "in_word")[0],
                                [1, 1, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(probes.byte_labels(tokens_BT, "after_space")[0],
                                [0, 0, 0, 1, 0, 0, 0, 1, 0])


class ByteFeatures(nn.Module):
  """A parameter-free model whose site "hidden" holds [is digit, byte / 255] per token."""

  @nn.compact
  def __call__(self, tokens_BT):
    digit_BT = ((tokens_BT >= 48) & (tokens_BT <= 57)).astype(np.float32)
    return Site(name="hidden")(jax.numpy.stack([tokens_BT / 255.0, digit_BT], -1))


def test_probe_dataset_reads_the_site_on_real_tokens_and_a_probe_finds_the_digit_neuron():
  tokens_BT = np.array([list(b"x = 12 + y3"), list(b"def f(a_9):")])
  weights_BT = np.ones(tokens_BT.shape)
  weights_BT[1, -1] = 0
  acts_NF, labels_N = probes.probe_dataset(ByteFeatures(), {}, [{"inputs": tokens_BT,
                                                                 "weights": weights_BT}],
                                           "hidden", "digit")
  assert acts_NF.shape == (21, 2)
  np.testing.assert_array_equal(labels_N, np.isin(tokens_BT.ravel()[:21], list(b"0123456789")))
  np.testing.assert_allclose(acts_NF[:, 0], tokens_BT.ravel()[:21] / 255.0, rtol=1e-6)
  probe = probes.fit_sparse_probe(acts_NF, labels_N, 1, l2=0.1)
  assert int(probe.indices_K[0]) == 1 and float(probe.accuracy) == 1.0
