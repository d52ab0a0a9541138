"""Claim: a dense LM continued as an upcycled MoE beats continuing it dense and an MoE from scratch.

  python -m experiments.claims upcycling [--seeds 3] [--fast]

Per seed, through the real trainer at `lm_runs.SMALL` size (2 blocks of width 64, 16 x 64
bytes a step): pretrains the dense GELU LM (`configs/lm_dense.py`) for P = 300 steps, then
trains E = 300 extra steps three ways: the dense checkpoint continued as a top-2 of 8 MoE whose
experts copy its FFN (`configs/moe_lm_upcycle.py`: `init.from_workdir` + `init.upcycle`), the
dense checkpoint continued dense (`init.from_workdir`), and the same MoE from a random init.
Every continuation restarts the optimizer, the schedule and the data order. (The MoE from
scratch for P + E steps, the paper's equal-total-steps arm, is left out for time.) A full run
(3 seeds x 1,200 steps, half of them MoE steps) takes about 6 minutes of CPU time on 2 cores;
`--fast` runs 2-step phases of a 1-block width-32 model on the first seed only, without the MoE
from scratch.
"""
import os
import tempfile
from typing import Sequence

from experiments import claims
from experiments.claims import moe_lm_flops
from experiments.configs import lm_dense
from experiments.configs import moe_lm_upcycle


RIVALS = ("dense_continued", "moe_scratch")  # what the upcycled MoE must beat
FAST_ARMS = 2  # --fast: the upcycled and the dense continuation only


def moe_scratch():
  """`moe_lm_upcycle.py`'s MoE from a random init."""
  c = moe_lm_upcycle.get_config()
  c.init.upcycle = False
  return c


def warm_start(workdir: str):
  """A finish step that starts the run from `workdir`'s last checkpoint."""
  def finish(config):
    config.init.from_workdir = workdir
    return config
  return finish


def run(seeds: Sequence[int], fast: bool) -> dict:
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds[:1] if fast else seeds:
      dense_dir = os.path.join(scratch, f"dense_{seed}")
      config = moe_lm_flops.small_config(lm_dense.get_config, seed, fast)
      pretrain_steps = config.train.num_steps
      rows.append({**moe_lm_flops.train_row("dense_pretrained", seed, config, dense_dir),
                   "total_steps": pretrain_steps})
      arms = (("upcycled", moe_lm_upcycle.get_config, warm_start(dense_dir), pretrain_steps),
              ("dense_continued", lm_dense.get_config, warm_start(dense_dir), pretrain_steps),
              ("moe_scratch", moe_scratch, None, 0))
      for name, factory, finish, before in arms[:FAST_ARMS] if fast else arms:  # before: the steps of its starting point
        config = moe_lm_flops.small_config(factory, seed, fast, finish)
        row = moe_lm_flops.train_row(name, seed, config, os.path.join(scratch, f"{name}_{seed}"))
        rows.append({**row, "total_steps": before + config.train.num_steps})
  return {"runs": rows}


def table(payload: dict) -> str:
  runs = payload["runs"]
  bpb, load = claims.group(runs, "arm", "eval_bpb"), claims.group(runs, "arm", moe_lm_flops.LOAD)
  first = {}
  for r in runs:
    first.setdefault(r["arm"], r)
  rows = [[f"`{arm}`", first[arm]["total_steps"], f"{first[arm]['ffn_flops']:,}",
           claims.fmt(bpb[arm]), moe_lm_flops._cell(load[arm])] for arm in bpb]
  return claims.markdown_table(
      ["arm", "steps in all", "active FFN FLOPs / token", "eval bpb", "max/mean load"], rows)


def judge(payload: dict) -> tuple[str, str]:
  """Upcycled below dense-continued and below the MoE from scratch at E steps."""
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  stats = {arm: claims.mean_std(v) for arm, v in bpb.items()}
  rivals = [arm for arm in RIVALS if arm in bpb]
  checks = {arm: moe_lm_flops.compare(bpb["upcycled"], bpb[arm]) for arm in rivals}
  cells = ", ".join(f"{arm} {stats[arm][0]:.3f} ± {stats[arm][1]:.3f} ({checks[arm]})"
                    for arm in rivals)
  return moe_lm_flops.verdict_of(list(checks.values())), (
      f"From dense pretraining at {stats['dense_pretrained'][0]:.3f} bpb, the extra steps reach "
      f"{stats['upcycled'][0]:.3f} ± {stats['upcycled'][1]:.3f} upcycled against {cells} "
      f"(clear: every upcycled seed below every seed of the other arm).")


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, claims.group(payload["runs"], "arm", "eval_bpb"), "eval bits/byte",
                  "sparse upcycling: eval bpb per seed")


CLAIM = claims.Claim(
    name="upcycling",
    title="Sparse upcycling",
    source="Komatsuzaki et al., 2023, \"Sparse Upcycling: Training Mixture-of-Experts from "
           "Dense Checkpoints\"",
    statement="Continuing a dense checkpoint as an MoE whose experts start as copies of its FFN "
              "beats continuing it dense for the same extra steps, and beats an MoE trained "
              "from scratch on the same extra budget.",
    setup="The byte LM at the claims' small size (2 pre-LN blocks of width 64, 16 x 64 bytes a "
          "step, AdamW); the dense GELU LM is pretrained P steps, then trained E = P extra steps "
          "as an upcycled top-2 of 8 GELU MoE (experts copy its FFN, width F, fresh router, "
          "renormalised gates), as the dense LM, and as the same MoE from a random init; "
          "continuations restart optimizer, schedule and data order.",
    expected="upcycled below dense-continued and below the MoE from scratch at E steps, by more "
             "than the seed spread",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=6)
