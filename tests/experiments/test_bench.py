"""The benchmark harness: timing rows, ratio table, unknown names."""
import jax
import jax.numpy as jnp
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import timing


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


def test_interleaved_calls_run_round_robin_after_warmup():
  order = []
  rows = timing.interleaved_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                  repeats=2, warmup=1)
  assert order == ["a", "b"] * 3
  assert [r["case"] for r in rows] == ["a", "b"]
  for r in rows:
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
  with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
    timing.interleaved_calls({"a": lambda: None}, repeats=0)


def test_interleaved_cases_compile_each_case_under_its_own_mesh():
  seen = []
  def fn(x):
    seen.append(dict(jax.sharding.get_abstract_mesh().shape))  # at trace time only
    return x + 1
  x = jnp.ones((8,))
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  rows = timing.interleaved_cases({"meshed": (fn, (x,), mesh), "plain": (fn, (x,))}, repeats=2)
  assert seen == [{"data": 2}, {}]
  assert [r["case"] for r in rows] == ["meshed", "plain"]
  assert all(r["peak_bytes"] >= 64 for r in rows)
