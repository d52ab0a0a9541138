"""The sparse_train benchmark at tiny shapes: every case runs and the ratio columns add up."""
import json

import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main


def test_quick_writes_every_case(tmp_path):
  assert "sparse_train" in bench.benchmark_names()
  path = tmp_path / "sparse_train.json"
  assert bench_main.main(["sparse_train", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = {r["case"]: r for r in json.loads(path.read_text())}
  assert list(rows) == ["dense_step", "block_sparse_step", "block_sparse_step_d50"]
  assert [rows[c]["density"] for c in rows] == [1.0, 0.1, 0.5]
  for case, target in (("block_sparse_step", 0.6), ("block_sparse_step_d50", 1.0)):
    assert rows[case]["time_vs_dense"] == pytest.approx(
        rows[case]["median_s"] / rows["dense_step"]["median_s"])
    assert rows[case]["target"] == target
