"""Claim: SAM on the normalisation layers only (SAM-ON) beats plain AdamW for a 90 % sparse LM.

  python -m experiments.claims sam_on_norm [--seeds 3] [--fast]

Trains the small byte LM (`lm_runs.SMALL`: 2 blocks of width 64, 300 steps of 16 x 64 bytes)
with its FFN and attention kernels 90 % sparse (`configs/sam_lm.py`: a static random ERK mask
drawn from the seed) through the real trainer, four ways per seed: plain AdamW
(`train.sam_rho=0`); AdamW fed the SAM-ON gradient (`train.sam_rho` = 0.1 and 0.5, the ascent
step on the RMSNorm scales only); and AdamW fed the SAM gradient over every weight at the usual
SAM radius 0.05 (`train.sam_rule=".*"`; the kept weights only, pruned ones stay 0). Records eval
bits per byte. A full run is 12 training runs, the SAM ones evaluating the gradient twice per
step: 5.0 CPU-minutes measured (20 minutes of wall time on the 2-core machine shared with other
jobs at load 15-23), so about 5 minutes on an idle 2-core CPU. `--fast` trains three arms
(SAM-ON at rho 0.5 only) two steps at smoke-test size, first seed only (37 CPU-seconds).

Result: at this scale SAM-ON does not help. One pass over fresh data leaves nothing to
overfit (eval tracks train loss), so the flatter minimum SAM seeks has no gap to close.
"""
from typing import Callable, Sequence

import ml_collections

from experiments import claims
from experiments.claims import hash_vs_switch
from experiments.claims import lm_runs
from experiments.configs import sam_lm

TIE = 0.03  # bits/byte: the LM claims' tie margin, about twice the default LM's seed std
BASELINE = "adamw"
SAM_ON_RHOS = (0.1, 0.5)  # Mueller et al. tune SAM-ON's rho above SAM's usual 0.05
SAM_ALL_RHO = 0.05


def sam_config(rho: float, rule: str | None = None) -> ml_collections.ConfigDict:
  """`sam_lm.py` (90 % sparse FFN + attention kernels) with SAM radius `rho` on the params
  matching `rule` (None: the normalisation layers); rho 0 is plain AdamW."""
  config = sam_lm.get_config()
  config.train.sam_rho = rho
  if rule is not None:
    config.train.sam_rule = rule
  return config


def arms(sam_on_rhos: Sequence[float]) -> list[tuple[str, Callable]]:
  """(name, config factory) of AdamW, SAM-ON at each of `sam_on_rhos` and SAM over all
  weights."""
  return ([(BASELINE, lambda: sam_config(0.0))]
          + [(f"sam_on_{rho}", lambda rho=rho: sam_config(rho)) for rho in sam_on_rhos]
          + [(f"sam_all_{SAM_ALL_RHO}", lambda: sam_config(SAM_ALL_RHO, ".*"))])


def run(seeds: Sequence[int], fast: bool) -> dict:
  runs = lm_runs.train_arms(arms(SAM_ON_RHOS[-1:] if fast else SAM_ON_RHOS),
                            seeds[:1] if fast else seeds, fast, lm_runs.SMALL)
  return {"runs": runs, "density": sam_lm.get_config().sparsity.density}


def table(payload: dict) -> str:
  runs = payload["runs"]
  bpb, wall = claims.group(runs, "arm", "eval_bpb"), claims.group(runs, "arm", "wall_s")
  base = hash_vs_switch.mean(bpb[BASELINE])
  return claims.markdown_table(
      ["arm", "eval bpb", "minus AdamW", "train loss", "wall s", "seeds"],
      [[arm, claims.fmt(bpb[arm]), f"{hash_vs_switch.mean(bpb[arm]) - base:+.3f}",
        claims.fmt(claims.group(runs, "arm", "train_loss")[arm]), claims.fmt(wall[arm], 0),
        len(bpb[arm])] for arm in bpb])


def judge(payload: dict) -> tuple[str, str]:
  """yes: the best SAM-ON arm below AdamW on every seed and within TIE of SAM over all weights
  or below it; partly: SAM-ON's mean below AdamW's but inside the seed spread (or SAM-ON worse
  than full SAM by more than TIE); no: SAM-ON's mean not below AdamW's."""
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  mean = {arm: hash_vs_switch.mean(values) for arm, values in bpb.items()}
  best = min((arm for arm in bpb if arm.startswith("sam_on_")), key=mean.get)
  full = f"sam_all_{SAM_ALL_RHO}"
  vs_adamw = hash_vs_switch.compare(bpb[best], bpb[BASELINE])
  near_full = mean[best] <= mean[full] + TIE
  if mean[best] >= mean[BASELINE]:
    reproduced = "no"
  else:
    reproduced = "yes" if vs_adamw == "better" and near_full else "partly"
  verdict = (f"Eval bpb best SAM-ON ({best}) {claims.fmt(bpb[best])} vs AdamW "
             f"{claims.fmt(bpb[BASELINE])} ({mean[best] - mean[BASELINE]:+.3f}): {vs_adamw} "
             f"(better / worse = on every seed, tie = the seeds' ranges overlap); SAM on all "
             f"weights {claims.fmt(bpb[full])}, SAM-ON {'within' if near_full else 'beyond'} "
             f"{TIE} of it or below.")
  return reproduced, verdict


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, claims.group(payload["runs"], "arm", "eval_bpb"), "eval bits/byte",
                  f"{1 - payload['density']:.0%} sparse small LM: AdamW vs SAM-ON vs SAM (all)")


CLAIM = claims.Claim(
    name="sam_on_norm",
    title="SAM on normalisation layers for a sparse LM",
    source="Mueller, Vlaar, Rolnick and Hein, 2023, \"Normalization Layers Are All That "
           "Sharpness-Aware Minimization Needs\"; SAM: Foret et al., 2021, \"Sharpness-Aware "
           "Minimization for Efficiently Improving Generalization\"",
    statement="Applying the SAM ascent step only to the normalisation layers' affine parameters "
              "(SAM-ON, under 0.1 % of the weights) improves generalisation over the base "
              "optimizer, as much as or more than SAM over all parameters, with sparse "
              "perturbations.",
    setup="The small byte LM (2 pre-LN blocks of width 64, 300 AdamW steps of 16 windows of 64 "
          "bytes of the embedded stdlib corpus) with every FFN and attention kernel 90 % sparse "
          "(a static random mask, ERK over those kernels, drawn from the seed; embeddings and "
          "RMSNorm scales dense). Arms: plain AdamW; AdamW fed the SAM-ON gradient "
          "(ascent on the RMSNorm scales only) at rho 0.1 and 0.5; AdamW fed the SAM gradient "
          "over every kept weight at rho 0.05. The loss and learning-rate schedule are "
          "unchanged. Eval bpb on the validation files.",
    expected="the better SAM-ON arm below AdamW on every seed, and within the 0.03 bits/byte "
             "LM tie margin of SAM over all weights or below it",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=5)
