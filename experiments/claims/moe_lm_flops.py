"""Claim: at equal active FLOPs per token, a mixture-of-experts LM beats the dense LM.

  python -m experiments.claims moe_lm_flops [--seeds 3] [--fast]

Trains the byte LM at `lm_runs.SMALL` size (2 blocks of width D=64, 300 steps of 16 x 64 bytes)
once per seed for each arm, through the real trainer: the dense GELU FFN of width F=256, and
MoEs of 8 GELU experts whose active FFN FLOPs per token equal the dense FFN's up to the router
(+1.6 %): top-1 of 8 of width F (Switch, `configs/moe_lm_gelu.py`) and top-2 of 8 of width F/2
(GShard). The table lists each arm's active FFN FLOPs per token (`active_ffn_flops`, from the
widths), eval bits per byte and the max/mean expert load of the last logged training batch.
A full run (3 arms x 3 seeds of 300 steps) takes about 5 minutes of CPU time on 2 cores (an
MoE run costs about twice a dense one); `--fast` trains dense and top-1 for 2 steps at
1 block of width 32, on the first seed only.
"""
import os
import tempfile
from typing import Callable, Sequence

import ml_collections

from experiments import claims
from experiments.claims import lm_runs
from experiments.configs import lm_dense
from experiments.configs import moe_lm_gelu

LOAD = "load_max_over_mean"
# Config -> the same config after the SMALL / FAST sizes are applied (e.g. a width scaled).
Finish = Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]


def scale_width(fraction: float) -> Finish:
  """Sets model.d_ff to `fraction` of the configured dense width F (at least 1)."""
  def finish(config):
    config.model.d_ff = max(1, round(fraction * config.model.d_ff))
    return config
  return finish


def top2_gelu() -> ml_collections.ConfigDict:
  c = moe_lm_gelu.get_config()
  c.model.ffn.k = 2
  c.model.ffn.router_kwargs = {"order": "softmax_then_topk", "renormalize": True}
  return c


# (name, config factory, width fraction of F): equal active FFN FLOPs up to routing overheads.
# The README's other routers fit the same scheme (hash top-1 at F, expert choice k=2 at F/2,
# Soft MoE with 8 one-slot experts at F/8, a shared FFN at 3F/4 with top-2 rank-8 LoRA
# experts; `active_ffn_flops` counts them all) but did not fit the shared machine's time.
ARMS = (
    ("dense", lm_dense.get_config, 1.0),
    ("top1_gelu", moe_lm_gelu.get_config, 1.0),
    ("top2_gelu", top2_gelu, 0.5),
)
MAIN_MOES = ("top1_gelu", "top2_gelu")  # the claim's arms, judged against "dense"
FAST_ARMS = 2  # --fast: dense and top-1 on the first seed only


def active_ffn_flops(model: ml_collections.ConfigDict) -> int:
  """Forward FLOPs (2 per multiply-add) of one FFN layer per token, from `model`'s widths.

  With D = d_model, F = d_ff, m = 2 matrices per GELU FFN (3 for SwiGLU), E experts, k active:
  dense m D F; "moe" k m D F + D E (router; k is expert choice's average);
  "hash_moe" m D F; "soft_moe" with per-token groups E p m D F + 3 D S for S = E p slots
  (logits, dispatch, combine); "lora_moe" m D F + D E + k r (D + F) per adapted matrix.
  """
  ffn, d, f = model.ffn, model.d_model, model.d_ff
  name = ffn.name
  if name == "dense":
    macs = mats(ffn.get("activation", "gelu")) * d * f
  elif name == "moe":
    macs = ffn.k * mats(ffn.expert) * d * f + d * ffn.num_experts
  elif name == "hash_moe":
    macs = mats(ffn.expert) * d * f
  elif name == "soft_moe":
    if ffn.token_group_size != 1:
      raise ValueError(f"soft_moe FLOPs are counted for token_group_size=1, got "
                       f"{ffn.token_group_size}")
    slots = ffn.num_experts * ffn.slots_per_expert
    macs = slots * mats(ffn.expert) * d * f + 3 * d * slots
  elif name == "lora_moe":
    macs = (mats(ffn.expert) * d * f + d * ffn.num_experts
            + ffn.k * ffn.rank * (d + f) * len(ffn.targets))
  else:
    raise ValueError(f"model.ffn.name={name!r}; allowed: dense, moe, hash_moe, soft_moe, "
                     f"lora_moe")
  return 2 * macs


def mats(kind: str) -> int:
  """Weight matrices of one GELU ("gelu", "ffn") or SwiGLU ("swiglu") FFN."""
  return 3 if kind == "swiglu" else 2


def small_config(factory: Callable[[], ml_collections.ConfigDict], seed: int, fast: bool,
                 finish: Finish | None = None) -> ml_collections.ConfigDict:
  """`factory()` at `lm_runs.SMALL` size (FAST with `fast`) and `seed`, then `finish`."""
  config = lm_runs.configure(factory(), seed, fast, lm_runs.SMALL)
  return finish(config) if finish else config


def train_row(name: str, seed: int, config: ml_collections.ConfigDict, workdir: str,
              layer_metrics: Sequence[str] = (LOAD,),
              flops: Callable[[ml_collections.ConfigDict], int] = active_ffn_flops) -> dict:
  """One run of `config` in `workdir`: {"arm", "seed", "d_ff", "ffn_flops", eval_bpb, ...},
  with ffn_flops = flops(config.model)."""
  row = lm_runs.train_run(config, workdir, layer_metrics)
  row = {"arm": name, "seed": seed, "d_ff": config.model.d_ff,
         "ffn_flops": flops(config.model), **row}
  print(f"{name} seed {seed}: eval bpb {row['eval_bpb']:.4f} ({row['wall_s']} s)", flush=True)
  return row


def run(seeds: Sequence[int], fast: bool) -> dict:
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds[:1] if fast else seeds:
      for name, factory, fraction in ARMS[:FAST_ARMS] if fast else ARMS:
        config = small_config(factory, seed, fast, scale_width(fraction))
        rows.append(train_row(name, seed, config, os.path.join(scratch, f"{name}_{seed}")))
  return {"runs": rows}


def _cell(values: list) -> str:
  return "-" if any(v is None for v in values) else claims.fmt(values, 2)


def table(payload: dict) -> str:
  runs = payload["runs"]
  bpb, load = claims.group(runs, "arm", "eval_bpb"), claims.group(runs, "arm", LOAD)
  first = {}
  for r in runs:
    first.setdefault(r["arm"], r)
  dense_flops = first["dense"]["ffn_flops"]
  rows = [[f"`{arm}`", first[arm]["d_ff"],
           f"{first[arm]['ffn_flops']:,} ({first[arm]['ffn_flops'] / dense_flops:.3f}x)",
           claims.fmt(bpb[arm]), _cell(load[arm])] for arm in bpb]
  return claims.markdown_table(
      ["arm", "expert width", "active FFN FLOPs / token (vs dense)", "eval bpb",
       "max/mean load"], rows)


def compare(better: Sequence[float], worse: Sequence[float]) -> str:
  """"clear" if every seed of `better` is below every seed of `worse`, "inside" if only the
  mean is lower (the ordering is within the seed spread), else "no"."""
  if max(better) < min(worse):
    return "clear"
  return "inside" if claims.mean_std(better)[0] < claims.mean_std(worse)[0] else "no"


def verdict_of(checks: Sequence[str]) -> str:
  """"yes" if every check of `compare` is "clear", "no" if every one is "no", else "partly"."""
  if all(c == "clear" for c in checks):
    return "yes"
  return "no" if all(c == "no" for c in checks) else "partly"


def judge(payload: dict) -> tuple[str, str]:
  """Top-1 and top-2 GELU MoEs (those run) below dense: yes if all clearly, no if none."""
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  stats = {arm: claims.mean_std(v) for arm, v in bpb.items()}
  moes = [arm for arm in MAIN_MOES if arm in bpb]
  checks = {arm: compare(bpb[arm], bpb["dense"]) for arm in moes}
  others = sorted((a for a in bpb if a not in ("dense", *MAIN_MOES)), key=lambda a: stats[a][0])
  best = f"; best other router {others[0]} {stats[others[0]][0]:.3f}" if others else ""
  cells = ", ".join(f"{arm} {stats[arm][0]:.3f} ± {stats[arm][1]:.3f} ({checks[arm]})"
                    for arm in moes)
  return verdict_of(list(checks.values())), (
      f"At equal active FFN FLOPs, eval bpb dense {stats['dense'][0]:.3f} ± "
      f"{stats['dense'][1]:.3f}, {cells}{best} (clear: every seed below every dense seed).")


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, claims.group(payload["runs"], "arm", "eval_bpb"), "eval bits/byte",
                  "byte LM at equal active FFN FLOPs: eval bpb per seed")


CLAIM = claims.Claim(
    name="moe_lm_flops",
    title="MoE LMs at equal active FLOPs",
    source="Shazeer et al., 2017, \"Outrageously Large Neural Networks\"; Fedus et al., 2021, "
           "\"Switch Transformers\"",
    statement="At the same active FLOPs per token, a sparsely-gated mixture-of-experts LM "
              "reaches a lower loss than the dense LM, because it holds several times the FFN "
              "parameters.",
    setup="The byte LM at the claims' small size (2 pre-LN blocks of width 64, 300 AdamW steps "
          "of 16 x 64 bytes of the embedded stdlib corpus, eval on its validation files); every "
          "FFN is the dense GELU FFN of width F, or an MoE of GELU experts sized to the dense "
          "FFN's active FLOPs per token: top-1 of 8 of width F (Switch, gate not renormalised) "
          "and top-2 of 8 of width F/2 (renormalised gates); load-balance loss 1e-2, z-loss "
          "1e-3.",
    expected="top-1 and top-2 GELU MoEs below the dense LM's eval bpb, by more than the seed "
             "spread",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=5)
