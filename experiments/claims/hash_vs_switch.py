"""Claim: hash routing (a fixed token-id -> expert table) is competitive with Switch routing.

  python -m experiments.claims hash_vs_switch [--seeds 3] [--fast]

Trains the small byte LM (`lm_runs.SMALL`: 2 blocks of width 64, 300 steps of 16 x 64 bytes)
three ways per seed through the real trainer: a dense GELU FFN of hidden 256; Switch, 8 GELU
experts of hidden 256 with learned top-1 routing (gate = the softmax probability) and the Switch
load-balance loss 1e-2; and a hash layer, the same 8 experts routed by the balanced token-id
table. Both MoEs run one expert of the dense FFN's width per token, so active FLOPs equal the
dense model's. Records eval bits per byte and the max/mean expert load (mean over layers of
the last 50 training steps). A full run is 9 training runs: 5.0 CPU-minutes (measured; 28
minutes of wall time on the shared machine at load 6-20), so about 6 minutes on an idle 2-core
CPU. `--fast` trains each arm two steps at smoke-test size, first seed only.

The arm factories, `train`, `compare` (an ordering decided against the seeds' range) and
`bar_panels` are shared by the other routing claims, `avg_k` and `aux_free_balance`.
"""
from typing import Sequence

import ml_collections

from experiments import claims
from experiments.claims import lm_runs
from experiments.configs import lm_dense
from experiments.configs import moe_lm
from experiments.configs import moe_lm_hash

NUM_EXPERTS = 8
LOAD = "load_max_over_mean"  # max_e f_e / mean_e f_e of a batch's routing, logged per layer


def dense_config() -> ml_collections.ConfigDict:
  """The dense LM (its FFN hidden is SMALL's d_ff = 256)."""
  return lm_dense.get_config()


def switch_config(k: int = 1, load_balance_weight: float = 1e-2,
                  bias_update_rate: float = 0.0) -> ml_collections.ConfigDict:
  """`moe_lm.py` as a Switch layer: 8 GELU experts (of hidden model.d_ff, SMALL's 256 unless
  `train` is told otherwise), learned top-k routing with gates p[t, e] (renormalised over the
  k choices when k > 1), the load-balance loss at `load_balance_weight`, no z-loss, and
  aux-loss-free bias updates at `bias_update_rate`."""
  config = moe_lm.get_config()
  config.model.ffn.update(k=k, expert="ffn", router_kwargs={
      "order": "softmax_then_topk", "renormalize": k > 1},
      load_balance_weight=load_balance_weight, z_loss_weight=0.0,
      bias_update_rate=bias_update_rate)
  return config


def hash_config() -> ml_collections.ConfigDict:
  """`moe_lm_hash.py` with 8 GELU experts and the balanced table."""
  config = moe_lm_hash.get_config()
  config.model.ffn.expert = "ffn"
  return config


def compare(a: Sequence[float], b: Sequence[float]) -> str:
  """Where lower is better: "better" if every seed of `a` is below every seed of `b`, "worse"
  if every seed of `a` is above every seed of `b`, otherwise "tie" (the seeds' ranges overlap,
  so the ordering is inside the seed spread)."""
  if max(a) < min(b):
    return "better"
  if min(a) > max(b):
    return "worse"
  return "tie"


def mean(values: Sequence[float]) -> float:
  return claims.mean_std(values)[0]


def train(arms, seeds: Sequence[int], fast: bool, d_ff: int | None = None) -> list[dict]:
  """`lm_runs.train_arms` at SMALL size (FFN / expert hidden `d_ff` if given, else SMALL's
  256) logging the max/mean load; `fast`: the first seed only."""
  overrides = {**lm_runs.SMALL, **({} if d_ff is None else {"model.d_ff": d_ff})}
  return lm_runs.train_arms(arms, seeds[:1] if fast else seeds, fast, overrides,
                            layer_metrics=[LOAD])


def run(seeds: Sequence[int], fast: bool) -> dict:
  return {"runs": train([("dense", dense_config), ("switch", switch_config),
                         ("hash", hash_config)], seeds, fast)}


def load_cell(values: Sequence[float | None]) -> str:
  """mean ± std of max/mean load, or "-" for an arm without experts."""
  return "-" if None in values else claims.fmt(values, 2)


def table(payload: dict) -> str:
  runs = payload["runs"]
  bpb, load = claims.group(runs, "arm", "eval_bpb"), claims.group(runs, "arm", LOAD)
  wall = claims.group(runs, "arm", "wall_s")
  return claims.markdown_table(
      ["arm", "eval bpb", "max/mean expert load", "wall s", "seeds"],
      [[arm, claims.fmt(bpb[arm]), load_cell(load[arm]), claims.fmt(wall[arm], 0),
        len(bpb[arm])] for arm in bpb])


def judge(payload: dict) -> tuple[str, str]:
  """yes: hash not worse than Switch beyond the seed spread and both MoEs below dense beyond it;
  no: hash worse than Switch beyond the spread; partly otherwise."""
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  hash_vs_switch = compare(bpb["hash"], bpb["switch"])
  vs_dense = {arm: compare(bpb[arm], bpb["dense"]) for arm in ("switch", "hash")}
  if hash_vs_switch == "worse":
    reproduced = "no"
  else:
    reproduced = "yes" if set(vs_dense.values()) == {"better"} else "partly"
  verdict = (f"Eval bpb hash {claims.fmt(bpb['hash'])} vs Switch {claims.fmt(bpb['switch'])}: "
             f"hash {hash_vs_switch}; vs dense {claims.fmt(bpb['dense'])}: Switch "
             f"{vs_dense['switch']}, hash {vs_dense['hash']} (better / worse = on every seed, "
             f"tie = the seeds' ranges overlap).")
  return reproduced, verdict


def bar_panels(path: str, panels: Sequence[tuple[str, dict[str, Sequence[float]]]],
               title: str) -> None:
  """One panel of bars per (ylabel, {arm: seeds' values}): the mean, the seeds' min-max as an
  error bar and the seeds as dots."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (ylabel, groups) in zip(axes[0], panels):
    names = list(groups)
    for i, name in enumerate(names):
      values = np.asarray(groups[name], np.float64)
      ax.bar(i, values.mean(), color="tab:blue", alpha=0.6)
      ax.vlines(i, values.min(), values.max(), color="k")
      ax.plot(np.full(values.shape, i), values, "k.", markersize=4)
    low = min(min(v) for v in groups.values())
    high = max(max(v) for v in groups.values())
    pad = 0.1 * (high - low) or 0.05 * abs(high) or 0.1
    ax.set_ylim(max(0.0, low - 3 * pad), high + pad)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot(payload: dict, path: str) -> None:
  runs = payload["runs"]
  load = {arm: v for arm, v in claims.group(runs, "arm", LOAD).items() if None not in v}
  bar_panels(path, [("eval bits/byte", claims.group(runs, "arm", "eval_bpb")),
                    ("max/mean expert load", load)],
             "dense vs Switch vs hash (top-1 of 8 GELU experts), equal active FLOPs")


CLAIM = claims.Claim(
    name="hash_vs_switch",
    title="Hash layers vs Switch routing",
    source="Roller et al., 2021, \"Hash Layers For Large Sparse Models\"; Switch: Fedus et al., "
           "2021, \"Switch Transformers\"",
    statement="Routing each token to an expert by a fixed hash of its id, with no router and no "
              "balancing loss, is competitive with (or better than) learned Switch top-1 "
              "routing, and both beat the dense model of equal active FLOPs.",
    setup="The small byte LM (2 pre-LN blocks of width 64, 300 AdamW steps of 16 windows of 64 "
          "bytes of the embedded stdlib corpus) with, in every block: a dense GELU FFN of "
          "hidden 256; Switch, 8 GELU experts of hidden 256, learned top-1 routing (gate = "
          "router probability) with the Switch load-balance loss 1e-2; or a hash layer, the "
          "same 8 experts routed by the balanced token-id table (ids packed by train-split "
          "frequency). Dropless in both MoEs. Eval bpb on the validation files.",
    expected="hash within the seed range of Switch or below it; Switch and hash both below dense",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=6)
