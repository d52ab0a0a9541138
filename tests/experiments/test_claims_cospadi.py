"""The CoSpaDi claim's error metric, rows at equal budgets, and judge on hand cases."""
import numpy as np
import pytest

from experiments.claims import cospadi as claim


def test_relative_error_on_a_hand_worked_case():
  w_IO = np.array([[1.0, 0.0], [0.0, 2.0]])
  x_NI = np.array([[1.0, 1.0]])
  # x w = [1, 2]; x w_hat = [1, 0]: error 2 / sqrt(5).
  assert claim.relative_error(w_IO, np.diag([1.0, 0.0]), x_NI) == pytest.approx(2 / np.sqrt(5))


def test_rows_compare_every_method_at_the_same_budget():
  rng = np.random.default_rng(0)
  w_IO = rng.normal(size=(16, 16)).astype(np.float32)
  x_NI = rng.normal(size=(64, 16)).astype(np.float32)
  rows = claim.layer_rows("random", w_IO, x_NI[:32], x_NI[32:], (0.5,), (4, 16), iters=2)
  assert [r["method"] for r in rows] == ["sparsegpt", "wanda", "cospadi s=4 M=4"]
  assert rows[2]["params"] == 16 * 4 + 16 * 4 <= rows[0]["params"] == 128
  assert all(0 < r["error"] < 1.5 for r in rows)


def _payload(cospadi_errors: dict[str, list[float]]) -> dict:
  """W_in and W_out at d = 0.5, SparseGPT error 0.2, Wanda 0.3, and CoSpaDi s=8 at 0.5 plus s=16
  at the given per-seed errors."""
  rows = []
  for layer, errors in cospadi_errors.items():
    for seed, error in enumerate(errors):
      base = {"layer": layer, "shape": [8, 8], "density": 0.5, "params": 32, "seed": seed}
      rows += [{**base, "method": "sparsegpt", "error": 0.2},
               {**base, "method": "wanda", "error": 0.3},
               {**base, "method": "cospadi s=8 M=3", "error": 0.5},
               {**base, "method": "cospadi s=16 M=2", "error": error}]
  return {"source": "hand", "iters": 1, "rows": rows}


def test_judge_takes_cospadis_best_sparsity_against_sparsegpt():
  reproduced, verdict = claim.judge(_payload({"W_in": [0.10, 0.12], "W_out": [0.15, 0.15]}))
  assert reproduced == "yes"
  assert "W_in d = 0.5: 0.110 vs 0.200" in verdict and "wins 2 of 2" in verdict
  assert claim.judge(_payload({"W_in": [0.10, 0.12], "W_out": [0.25, 0.25]}))[0] == "partly"
  assert claim.judge(_payload({"W_in": [0.1, 0.29], "W_out": [0.25, 0.25]}))[0] == "partly"
  assert claim.judge(_payload({"W_in": [0.3, 0.3], "W_out": [0.25, 0.25]}))[0] == "no"


def test_table_has_one_row_per_layer_density_and_method():
  text = claim.table(_payload({"W_in": [0.10, 0.12]}))
  assert "| W_in [8, 8] | 0.5 | cospadi s=16 M=2 | 32 | 0.1100 ± 0.0141 |" in text
  assert text.count("\n| W_in") == 4
