"""The SAE benchmark: its two training steps compute the same thing; --quick writes every case."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import sae as sae_bench

CASES = ["topk_dense_decode", "topk_sparse_decode", "sparse_encoder_forward",
         "dense_score_matmul"]


def test_is_a_registered_benchmark():
  assert "sae" in bench.benchmark_names()


def test_both_losses_equal_a_numpy_topk_sae():
  params = sae_bench.init_sae(jax.random.key(0), 8, 64)
  x_TD = jax.random.normal(jax.random.key(1), (10, 8))
  p = {name: np.asarray(value, np.float64) for name, value in params.items()}
  pre_TN = np.asarray(x_TD, np.float64) @ p["W_enc"] + p["b_enc"]
  kth_T1 = np.sort(pre_TN, axis=1)[:, -3:-2]
  acts_TN = np.where(pre_TN >= kth_T1, np.maximum(pre_TN, 0), 0)
  want = np.mean((acts_TN @ p["W_dec"] + p["b_dec"] - np.asarray(x_TD)) ** 2)
  for loss in (sae_bench.dense_decode_loss, sae_bench.sparse_decode_loss):
    assert float(loss(params, x_TD, 3)) == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1, rtol=1e-6)


def test_max_relative_difference_is_per_leaf_relative_to_the_reference():
  got = {"a": jnp.array([1.0, 2.1]), "b": jnp.array([100.0])}
  want = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([101.0])}
  assert sae_bench.max_relative_difference(got, want) == pytest.approx(0.05, rel=1e-5)


def test_quick_run_writes_every_case(tmp_path, capsys):
  path = tmp_path / "sae.json"
  assert bench_main.main(["sae", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [r["case"] for r in rows] == CASES
  assert all(r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
  by_case = {r["case"]: r for r in rows}
  sparse = by_case["topk_sparse_decode"]
  assert sparse["speedup"] == pytest.approx(
      by_case["topk_dense_decode"]["median_s"] / sparse["median_s"])
  assert sparse["max_rel_diff"] <= sae_bench.TOLERANCE and sparse["target"] == 3.0
  assert by_case["sparse_encoder_forward"]["share_of_sparse"] == pytest.approx(
      by_case["sparse_encoder_forward"]["median_s"] / sparse["median_s"])
  assert "speedup_vs_topk_dense_decode" in capsys.readouterr().out
