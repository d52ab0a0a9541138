"""Moirai-MoE's setting: one shared input/output projection and token-level MoE FFNs, on
synthetic multi-frequency series (against forecast_dense.py, the Moirai baseline).

Command:
  python -m experiments.train --config=experiments/configs/forecast_moe.py --workdir=/tmp/forecast_moe

forecast_dense.py's backbone and data, with one projection for every frequency and, in both
layers, a top-2 dropless MoE of 8 GELU experts of hidden 128 (each patch token runs the dense
FFN's hidden width of 256; 4x its FFN parameters), so experts specialise by the data of each
token rather than by a hand-assigned frequency (Liu et al. 2024, "Moirai-MoE").

Expected on a 2-core CPU: 5.5 minutes wall measured on the shared, loaded machine
(10-18 steps/s after 11-45 s of compiling), 297,352 parameters, 100,744 active per token.

Measured (3000 steps, final eval over 1024 validation windows; the persistence forecast's MSE
is 1.154), eval MSE overall / 15min / hourly / daily / monthly, seeds 0 and 1
(`--config.seed=1`), from each run's DIR/metrics.jsonl:
  forecast_dense.py (per-frequency projections, dense FFN): 0.1051/0.0550/0.1131/0.1713/0.0809
                                                 seed 1: 0.1055/0.0554/0.1148/0.1713/0.0806
  forecast_moe.py (shared projection, top-2 of 8 experts):  0.1269/0.0596/0.1359/0.1960/0.1162
                                                 seed 1: 0.1265/0.0607/0.1339/0.1947/0.1168
  forecast_dense.py --config.forecast.projection=shared:   0.1307/0.0604/0.1407/0.1994/0.1225
The frequency-specific baseline wins at every frequency (MSE 17 % lower than the MoE). Here
the frequency label is exactly what sets a series' periods and noise, so the per-frequency
projections get true side information the shared model must infer from the context; the MoE
recovers part of it (3 % below the shared dense model at equal active compute) but not all. The
paper's claim rests on real data, where the frequency label is an unreliable proxy; this
synthetic set does not reproduce it.
"""
import ml_collections

from experiments.configs import forecast_dense


def get_config() -> ml_collections.ConfigDict:
  c = forecast_dense.get_config()
  c.forecast.projection = "shared"
  c.model.d_ff = 128
  c.model.ffn = ml_collections.ConfigDict({
      "name": "moe", "num_experts": 8, "k": 2, "router": "top_k",
      "router_kwargs": {"order": "softmax_then_topk", "renormalize": True},
      "capacity_factor": None, "expert": "ffn", "load_balance_weight": 1e-2,
      "z_loss_weight": 1e-3})
  return c
