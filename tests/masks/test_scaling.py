"""Sparse scaling law: fit recovery on synthetic points, optimum on a closed-form case,
log-log interpolation and dense comparisons against hand-worked values."""
import itertools

import numpy as np
import pytest

from sparsejax.masks import scaling

TRUE = {"a_S": 30.0, "b_S": 1.2, "c_S": 5.0, "b_N": 0.3, "a_D": 2e5, "b_D": 0.4, "c": 1.2}


def naive_law(p, s, n, d):
  """Frantar et al. 2023 eq. 1 written out point by point."""
  return [(p["a_S"] * (1 - si) ** p["b_S"] + p["c_S"]) / ni ** p["b_N"]
          + (p["a_D"] / di) ** p["b_D"] + p["c"] for si, ni, di in zip(s, n, d)]


def test_law_on_a_hand_case():
  p = {"a_S": 2.0, "b_S": 1.0, "c_S": 1.0, "b_N": 0.5, "a_D": 100.0, "b_D": 1.0, "c": 0.5}
  # S=0.5, N=4, D=50: (2 * 0.5 + 1) / 2 + 100 / 50 + 0.5 = 1 + 2 + 0.5
  assert scaling.sparse_scaling_loss(p, 0.5, 4.0, 50.0) == pytest.approx(3.5)


def test_fit_recovers_known_params_from_noisy_points():
  s, n, d = map(np.array, zip(*itertools.product((0.0, 0.5, 0.75, 0.875), (1e5, 3e5, 1e6, 3e6),
                                                  (1e7, 1e8, 1e9))))
  noise = np.exp(np.random.default_rng(0).normal(0.0, 1e-3, s.size))
  fit = scaling.fit_sparse_scaling_law(s, n, d, np.array(naive_law(TRUE, s, n, d)) * noise)
  assert fit.num_points == 48 and fit.rms_log_residual < 2e-3
  for name, value in TRUE.items():
    assert fit.params[name] == pytest.approx(value, rel=0.1), name


def test_fit_rejects_too_few_points_and_bad_sparsity():
  with pytest.raises(ValueError, match="need >= 7"):
    scaling.fit_sparse_scaling_law([0.5] * 3, [1e6] * 3, [1e9] * 3, [2.0] * 3)
  with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)"):
    scaling.fit_sparse_scaling_law([1.0] * 7, [1e6] * 7, [1e9] * 7, [2.0] * 7)


# b_S = b_D = 1, c_S = 0: L(S) = A (1 - S) + B / (1 - S) + c, A = a_S N^-b_N, B = 6 a_D N / C,
# minimised at 1 - S = sqrt(B / A) (when <= 1) with L = 2 sqrt(A B) + c.
HAND = {"a_S": 400.0, "b_S": 1.0, "c_S": 0.0, "b_N": 0.5, "a_D": 1e3, "b_D": 1.0, "c": 1.0}


def test_optimal_sparsity_closed_form():
  best = scaling.optimal_sparsity(HAND, 1e6, 6e10)  # A = 0.4, B = 0.1
  assert best["sparsity"] == pytest.approx(0.5, abs=1e-5)
  assert best["tokens"] == pytest.approx(6e10 * 0.5 / 6e6, rel=1e-4)
  assert best["loss"] == pytest.approx(2 * np.sqrt(0.04) + 1.0, abs=1e-9)
  assert best["dense_loss"] == pytest.approx(0.4 + 0.1 + 1.0)


def test_optimal_sparsity_is_dense_when_tokens_are_scarce():
  best = scaling.optimal_sparsity(HAND, 1e6, 6e9)  # A = 0.4, B = 1 > A: the optimum is S = 0
  assert best["sparsity"] == pytest.approx(0.0, abs=1e-6)
  assert best["loss"] == pytest.approx(best["dense_loss"]) and best["dense_loss"] == 2.4


def test_tokens_at_budget():
  assert scaling.tokens_at_budget(0.75, 1e6, 2.4e13) == pytest.approx(2.4e13 * 0.25 / 6e6)


def test_interpolate_loglog_is_exact_on_a_power_law_and_refuses_to_extrapolate():
  xs, ys = [1.0, 100.0, 100.0], [3.0, 0.2, 0.45]  # the two ys at x=100 average to 0.3 (log)
  assert scaling.interpolate_loglog(xs, ys, 10.0) == pytest.approx(np.sqrt(3.0 * 0.3))
  assert scaling.interpolate_loglog(xs, ys, 100.0) == pytest.approx(0.3)
  assert scaling.interpolate_loglog(xs, ys, 0.5) is None
  assert scaling.interpolate_loglog(xs, ys, 1000.0) is None


def test_compare_to_dense_at_equal_key():
  rows = [{"name": "d1", "density": 1.0, "nonzero_params": 1e4, "loss": 4.0},
          {"name": "d2", "density": 1.0, "nonzero_params": 1e6, "loss": 1.0},
          {"name": "s1", "density": 0.1, "nonzero_params": 1e5, "loss": 1.5},
          {"name": "s2", "density": 0.1, "nonzero_params": 1e7, "loss": 0.5}]
  out = scaling.compare_to_dense(rows, "nonzero_params")
  assert [r["name"] for r in out] == ["s1", "s2"]
  assert out[0]["dense_loss"] == pytest.approx(2.0) and out[0]["delta"] == pytest.approx(-0.5)
  assert out[1]["dense_loss"] is None and out[1]["delta"] is None
  with pytest.raises(ValueError, match="no dense run"):
    scaling.compare_to_dense(rows[2:], "nonzero_params")


def test_compare_to_dense_only_against_dense_runs_with_the_same_tokens():
  rows = [{"density": 1.0, "tokens": 10, "nonzero_params": 1e4, "loss": 4.0},
          {"density": 1.0, "tokens": 10, "nonzero_params": 1e6, "loss": 1.0},
          {"density": 1.0, "tokens": 99, "nonzero_params": 1e5, "loss": 0.1},
          {"density": 0.5, "tokens": 10, "nonzero_params": 1e5, "loss": 1.5},
          {"density": 0.5, "tokens": 50, "nonzero_params": 1e5, "loss": 1.5}]
  same, other = scaling.compare_to_dense(rows, "nonzero_params", same=("tokens",))
  assert same["dense_loss"] == pytest.approx(2.0) and other["dense_loss"] is None
  mixed = scaling.compare_to_dense(rows, "nonzero_params")[0]  # all dense runs: 0.1 at 1e5
  assert mixed["dense_loss"] == pytest.approx(0.1)


def test_fit_from_a_given_start():
  s, n, d = map(np.array, zip(*itertools.product((0.0, 0.5, 0.9), (1e5, 1e6, 1e7), (1e7, 1e9))))
  start = {k: v * 1.3 for k, v in TRUE.items()}
  fit = scaling.fit_sparse_scaling_law(s, n, d, naive_law(TRUE, s, n, d), init=start)
  assert fit.rms_log_residual < 1e-6
  assert fit.params["b_N"] == pytest.approx(TRUE["b_N"], rel=1e-3)
