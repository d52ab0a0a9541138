"""The Monarch benchmark: its losses are the hand-written ones; --quick writes both cases."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import monarch as monarch_bench


def test_is_a_registered_benchmark():
  assert "monarch" in bench.benchmark_names()


def test_losses_are_the_cotangent_weighted_outputs():
  x = np.array([[1.0, 2.0]])
  cot = np.array([[3.0, -1.0]])
  dense = {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "bias": jnp.array([1.0, 1.0])}
  assert float(monarch_bench.dense_loss(dense, x, cot)) == pytest.approx(2 * 3 - 3)
  # b = 2 blocks of 1 x 1: R scales inputs by (2, 5), L by (7, 11); with P = S = 1 both
  # permutations are the identity, so y = (1 * 2 * 7, 2 * 5 * 11) + bias.
  blocks = {"r_blocks": jnp.array([2.0, 5.0]).reshape(2, 1, 1),
            "l_blocks": jnp.array([7.0, 11.0]).reshape(2, 1, 1), "bias": jnp.array([1.0, 1.0])}
  assert float(monarch_bench.monarch_loss(blocks, x, cot)) == pytest.approx(15 * 3 - 111)


def test_quick_run_writes_both_cases(tmp_path, capsys):
  path = tmp_path / "monarch.json"
  assert bench_main.main(["monarch", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [r["case"] for r in rows] == ["dense_b256", "monarch_b256"]
  assert all(r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
  fast = rows[1]
  assert fast["speedup"] == pytest.approx(rows[0]["median_s"] / fast["median_s"])
  assert fast["max_rel_diff"] <= monarch_bench.TOLERANCE and fast["target"] == 4.0
  assert "speedup_vs_dense_b256" in capsys.readouterr().out
