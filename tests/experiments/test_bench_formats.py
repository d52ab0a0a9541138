"""The sparse-formats benchmark: --quick writes every case with its path and ratios."""
import json

import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main

CASES = ["dense_b1", "csr_b1", "bitmap_b1", "condensed_b1", "bitmap_gather_b1", "dense_grad_b1",
         "csr_grad_b1", "bitmap_grad_b1", "dense_b64", "csr_b64", "bitmap_b64", "condensed_b64",
         "csr_gather_b64", "dense_grad_b64", "csr_grad_b64", "bitmap_grad_b64"]


def test_is_a_registered_benchmark():
  assert "formats" in bench.benchmark_names()


def test_quick_run_writes_every_case(tmp_path, capsys):
  path = tmp_path / "formats.json"
  assert bench_main.main(["formats", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [r["case"] for r in rows] == CASES
  by_case = {r["case"]: r for r in rows}
  assert by_case["csr_b1"]["path"] == "gather" and by_case["csr_b64"]["path"] == "densify"
  assert by_case["bitmap_b1"]["path"] == "densify"
  assert by_case["bitmap_gather_b1"]["path"] == "gather"
  assert by_case["csr_grad_b64"]["speedup_vs_dense_same_batch"] == pytest.approx(
      by_case["dense_grad_b64"]["median_s"] / by_case["csr_grad_b64"]["median_s"])
  assert "speedup_vs_dense_b1" in capsys.readouterr().out
