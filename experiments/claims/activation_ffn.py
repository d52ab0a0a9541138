"""Top-k and predicted sparse FFNs vs the dense FFN on the default LM, at equal steps.

  python -m experiments.claims activation_ffn [--seeds 1] [--fast]

Trains experiments/configs/lm_dense.py, topk_ffn_lm.py and predicted_ffn_lm.py (10 % of the
hidden units active per token) for 400 steps each, exactly as `python -m experiments.train
--config=...` would (`lm_runs.train_arms`), and records the final eval bpb, the active fraction
and, for "predicted", the predictor's recall of the true top-k (both averaged over layers from the
last logged training window). About 10-12 minutes per seed on an idle 2-core CPU. `--fast`: one
block of width 32, 2 steps.
"""
from typing import Sequence

from experiments import claims
from experiments.claims import lm_runs
from experiments.configs import lm_dense
from experiments.configs import predicted_ffn_lm
from experiments.configs import topk_ffn_lm

ARMS = (("dense", lm_dense.get_config), ("topk", topk_ffn_lm.get_config),
        ("predicted", predicted_ffn_lm.get_config))
COST = 0.03  # bits/byte: "costs little", about twice the default LM's seed std (default_lm)


def run(seeds: Sequence[int], fast: bool) -> dict:
  rows = lm_runs.train_arms(ARMS, seeds, fast,
                            layer_metrics=("ffn/active_fraction", "ffn/recall"))
  for row in rows:
    fraction = row.pop("ffn/active_fraction")
    row["active_fraction"] = 1.0 if fraction is None else fraction
    row["recall"] = row.pop("ffn/recall")
  return {"runs": rows}


def table(payload: dict) -> str:
  rows = payload["runs"]
  cells = []
  for arm, bpb in claims.group(rows, "arm", "eval_bpb").items():
    mine = [r for r in rows if r["arm"] == arm]
    recall = [r["recall"] for r in mine if r["recall"] is not None]
    cells.append([f"`{arm}`", claims.fmt(bpb), claims.fmt([r["active_fraction"] for r in mine]),
                  claims.fmt(recall, 2) if recall else "-", mine[0]["steps"]])
  return claims.markdown_table(
      ["FFN (default LM)", "eval bpb", "hidden units active", "predictor recall of the top-k",
       "steps"], cells)


def judge(payload: dict) -> tuple[str, str]:
  """Yes when both the top-k and the predicted FFN cost under COST bits/byte over dense at equal
  steps, partly when only the top-k FFN does, no otherwise."""
  bpb = {arm: claims.mean_std(v)[0]
         for arm, v in claims.group(payload["runs"], "arm", "eval_bpb").items()}
  recall = [r["recall"] for r in payload["runs"] if r["recall"] is not None]
  topk_cost, predicted_cost = bpb["topk"] - bpb["dense"], bpb["predicted"] - bpb["dense"]
  reproduced = ("yes" if topk_cost < COST and predicted_cost < COST else
                "partly" if topk_cost < COST else "no")
  return reproduced, (f"Keeping the 10 % largest hidden units costs {topk_cost:+.3f} bits/byte "
                      f"over dense ({bpb['dense']:.3f}); a predictor choosing them from the FFN's "
                      f"input (recall {claims.mean_std(recall)[0]:.2f}) costs "
                      f"{predicted_cost:+.3f}.")


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, claims.group(payload["runs"], "arm", "eval_bpb"), "eval bits/byte",
                  "FFN activation sparsity (10 % of hidden units) at equal steps")


CLAIM = claims.Claim(
    name="activation_ffn",
    title="Activation-sparse FFNs at equal steps",
    source="Mirzadeh et al. 2023, ReLU Strikes Back; Liu et al. 2023, Deja Vu (predicted "
           "activation sparsity); Song et al. 2024, PowerInfer",
    statement="Most FFN hidden units can be skipped per token at little quality cost, and a cheap "
              "predictor can choose which ones to compute before computing them.",
    setup="The default LM (`lm_dense.py`, 400 steps) with every FFN keeping 10 % of its hidden "
          "units per token: exact top-k (`topk_ffn_lm.py`) or a rank-32 predictor trained "
          "alongside (`predicted_ffn_lm.py`).",
    expected="top-k and predicted within 0.03 bits/byte of dense",
    run=run, table=table, judge=judge, plot=plot, default_seeds=1, minutes=30)
