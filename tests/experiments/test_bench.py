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


def test_interleaved_cases_time_every_case_each_round():
  calls = []
  def counted(name):
    def fn(x):
      calls.append(name)  # runs at trace time only: once per case
      return x * 2
    return fn
  x = jnp.ones((8,))
  rows = timing.interleaved_cases({"a": (counted("a"), (x,)), "b": (counted("b"), (x,))},
                                  repeats=3)
  assert [r["case"] for r in rows] == ["a", "b"] and calls[:2] == ["a", "b"]
  for r in rows:
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["peak_bytes"] >= 64
