"""Sparse NAS: exact-budget density vectors and a tiny search through the trainer's train step."""
import numpy as np
import pytest

from experiments import sparse_nas
from experiments.configs import sparse_mlp


def test_integer_counts_hand_worked():
  # floor [2, 1, 3] = 6, one more where ideal - c is largest (0.6 at layer 0)
  np.testing.assert_array_equal(sparse_nas.integer_counts([2.6, 1.2, 3.2], [3, 5, 4], 7), [3, 1, 3])
  # floor/clip [5, 1] = 6 > 4: layer 1 is at its minimum of 1, so layer 0 gives up 2
  np.testing.assert_array_equal(sparse_nas.integer_counts([5.0, 0.2], [10, 10], 4), [3, 1])
  with pytest.raises(ValueError, match=r"total=1 kept weights must be in \[2, 20\]"):
    sparse_nas.integer_counts([0.5, 0.5], [10, 10], 1)


def test_capped_counts_hand_worked():
  # eps = 11 / 12, nothing capped
  np.testing.assert_allclose(sparse_nas.capped_counts([1, 1], [10, 2], 11), [110 / 12, 22 / 12])
  # eps = 11 / 18 caps layer 1 (4 eps > 1) at 2; then eps = 9 / 10
  np.testing.assert_allclose(sparse_nas.capped_counts([1, 4], [10, 2], 11), [9, 2])


def test_sampled_counts_hit_the_budget_exactly():
  rng = np.random.default_rng(0)
  sizes = np.array([19200, 30000, 1000])
  for total in (3, 10, 2510, 25100, 50197, 50200):
    for _ in range(20):
      counts = sparse_nas.sample_counts(sizes, total, rng, spread=30.0)
      assert counts.sum() == total
      assert np.all(counts >= 1) and np.all(counts <= sizes)


def _config():
  config = sparse_mlp.get_config("static")
  config.classifier.name = "mlp"
  config.classifier.hidden = (12,)
  config.sparsity.init = "magnitude"  # no PRNG kernels to compile
  return config


def test_search_trains_every_candidate_at_the_exact_budget():
  rows = sparse_nas.search(_config(), trials=1, steps=2, budget=0.1, seeds=[0], dass_steps=1)
  assert sorted(r["name"] for r in rows) == ["dass", "erk", "random_0", "uniform"]
  sizes = {"layer_0/kernel": 64 * 12, "head/kernel": 12 * 10}
  total = round(0.1 * sum(sizes.values()))
  for r in rows:
    assert r["kept"] == r["counts"] and sum(r["counts"].values()) == total
    assert r["densities"] == {p: r["counts"][p] / n for p, n in sizes.items()}
    assert all(0 <= a <= 1 for a in r["val_accuracy"] + r["test_accuracy"])
  means = [np.mean(r["val_accuracy"]) for r in rows]
  assert means == sorted(means, reverse=True)
  assert "val acc %" in sparse_nas.table(rows) and "uniform" in sparse_nas.summary(rows)


def test_search_rejects_pruning_updaters():
  config = _config()
  config.sparsity.updater.name = "magnitude"
  with pytest.raises(ValueError, match="keeps per-layer counts|keep per-layer counts"):
    sparse_nas.search(config, trials=1, steps=1, budget=0.1, seeds=[0])


def test_safs_search_scores_activation_choices_at_given_counts():
  counts = {"head/kernel": 30, "layer_0/kernel": 60}
  config = _config()
  config.sparsity.density = 0.1
  result, rows = sparse_nas.safs_search(config, counts, lahc_steps=0, steps=2, seeds=[0])
  assert result.best == ("relu",) and list(rows) == [("relu",)]
  assert rows[("relu",)]["kept"] == counts
  assert result.best_score == np.mean(rows[("relu",)]["val_accuracy"])
