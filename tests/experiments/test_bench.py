"""The benchmark harness: timing rows, ratio table, unknown names."""
import jax.numpy as jnp
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import timing


def test_case_row_has_median_and_peak_bytes():
  x = jnp.ones((64, 64), jnp.float32)
  row = timing.case("matmul", lambda a: a @ a, x, repeats=3, flops=2 * 64**3)
  assert row["case"] == "matmul" and row["flops"] == 2 * 64**3
  assert row["median_s"] > 0
  assert row["peak_bytes"] >= 2 * 64 * 64 * 4  # the argument and the output


def test_table_prints_ratios_against_the_baseline():
  rows = [{"case": "base", "median_s": 2.0, "peak_bytes": None},
          {"case": "fast", "median_s": 0.5, "peak_bytes": 2**20}]
  table = bench_main.format_table(rows, "base").splitlines()
  assert table[0].split() == ["case", "median_ms", "peak_MiB", "speedup_vs_base"]
  assert table[1].split() == ["base", "2000.00", "-", "1.00x"]
  assert table[2].split() == ["fast", "500.00", "1.0", "4.00x"]


def test_unknown_benchmark_is_a_clear_error(capsys):
  with pytest.raises(ValueError, match="unknown benchmark 'nope'; allowed:"):
    bench.load("nope")
  with pytest.raises(SystemExit):
    bench_main.main(["nope"])
  assert "unknown benchmark 'nope'" in capsys.readouterr().err
