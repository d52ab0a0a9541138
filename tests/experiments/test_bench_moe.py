"""The MoE benchmark's baselines compute the same layer as sparsejax's MoE; --quick runs."""
import flax.linen as nn
import jax
import numpy as np

from experiments.bench import moe as moe_bench
from sparsejax.moe import layers


def _layer_and_inputs(capacity_factor):
  layer = layers.MoE(d_model=16, d_ff=24, num_experts=4, k=2, router_kwargs={"renormalize": True},
                     expert="ffn", capacity_factor=capacity_factor)
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 20, 16))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x_BTD)["params"])
  return layer, params, x_BTD


def test_onehot_einsum_baseline_equals_capacity_layer():
  layer, params, x_BTD = _layer_and_inputs(moe_bench.CAPACITY_FACTOR)
  expected, _ = layer.apply({"params": params}, x_BTD)
  np.testing.assert_allclose(moe_bench.onehot_einsum_moe(params, x_BTD), expected, atol=1e-5)


def test_ragged_dot_baseline_equals_dropless_layer():
  layer, params, x_BTD = _layer_and_inputs(None)
  expected, _ = layer.apply({"params": params}, x_BTD)
  np.testing.assert_allclose(moe_bench.ragged_dot_moe(params, x_BTD), expected, atol=1e-5)


def test_quick_run_has_every_case():
  rows = moe_bench.run(repeats=1, quick=True)
  assert [r["case"] for r in rows] == ["dense_ffn", "moe_dropless", "moe_capacity",
                                       "onehot_einsum", "ragged_dot", "dense_ffn_fine",
                                       "moe_dropless_fine"]
  assert all(r["median_s"] > 0 for r in rows)
  fine = {r["case"]: r for r in rows if r["shape"] == "fine"}
  assert fine["moe_dropless_fine"]["active_gflop"] == fine["dense_ffn_fine"]["active_gflop"]
  assert fine["dense_ffn_fine"]["time_vs_dense_ffn"] == 1.0
