"""The activations benchmark: registered, and a --quick run writes every case with its ratios."""
import json

import jax
import numpy as np
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import activations

CASES = ["dense_ffn_b1", "topk_ffn_b1", "predicted_ffn_b1", "predicted_ffn_b1_columns",
         "given_set_ffn_b1"]


def test_dense_ffn_equals_numpy():
  params = activations.init_params(jax.random.key(0), 4, 8, 2)
  x = np.arange(4, dtype=np.float32)[None] / 4
  pre = x @ np.asarray(params["wi"], np.float64)
  gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
  np.testing.assert_allclose(activations.dense_ffn(params, x), gelu @ np.asarray(params["wo"]),
                             rtol=1e-5)


def test_quick_run_writes_every_case(tmp_path, capsys):
  assert "activations" in bench.benchmark_names()
  path = tmp_path / "activations.json"
  assert bench_main.main(["activations", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [r["case"] for r in rows] == CASES
  base = rows[0]["median_s"]
  for row in rows[1:]:
    assert row["speedup"] == pytest.approx(base / row["median_s"])
    assert row["max_rel_diff"] <= activations.TOLERANCE
  by_case = {r["case"]: r for r in rows}
  assert by_case["topk_ffn_b1"]["target"] == 3.0 and by_case["predicted_ffn_b1"]["target"] == 2.0
  # D=16, F=64, k=6, R=4: dense reads 2 F D floats, the given-set case 2 k D.
  assert by_case["dense_ffn_b1"]["weights_MiB"] == pytest.approx(4 * 2 * 64 * 16 / 2**20)
  assert by_case["given_set_ffn_b1"]["weights_MiB"] == pytest.approx(4 * 2 * 6 * 16 / 2**20)
  assert "speedup_vs_dense_ffn_b1" in capsys.readouterr().out
