"""The CoSpaDi claim script on its random fallback layer, at tiny shapes."""
import numpy as np
import pytest

from experiments.claims import cospadi as claim


def test_relative_error_on_a_hand_worked_case():
  w_IO = np.array([[1.0, 0.0], [0.0, 2.0]])
  x_NI = np.array([[1.0, 1.0]])
  # x w = [1, 2]; x w_hat = [1, 0]: error 2 / sqrt(5).
  assert claim.relative_error(w_IO, np.diag([1.0, 0.0]), x_NI) == pytest.approx(2 / np.sqrt(5))


def test_rows_compare_every_method_at_the_same_budget():
  w_IO, x_calib, x_eval = claim.random_layer(size=16, rank=4, tokens=64)
  rows = claim.layer_rows("random", w_IO, x_calib, x_eval, (0.5,), (4, 16), iters=2)
  assert [r["method"] for r in rows] == ["sparsegpt", "wanda", "cospadi s=4 M=4"]
  assert rows[2]["params"] == 16 * 4 + 16 * 4 <= rows[0]["params"] == 128
  assert all(0 < r["error"] < 1.5 for r in rows)
