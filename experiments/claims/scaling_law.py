"""Claim: the sparse scaling law L(S, N, D) fits a sweep of sparse LMs, and its optimal sparsity
grows with the training budget.

  python -m experiments.claims scaling_law [--seeds 1] [--fast]

Trains a sweep of byte LMs through the real trainer (2 blocks, 64-byte windows, batches of 16):
widths {32, 64} x FFN sparsity {0, 0.5, 0.75, 0.9} x {100, 400} steps, the dense arm by
`configs/lm_dense.py` and the sparse ones by `configs/sparse_lm.py`'s mask settings (ERK over
the FFN kernels, RigL) at density 1 - s, then reads each finished workdir exactly as
`python -m experiments.scaling --runs DIR...` does (`experiments.scaling.read_run`: S = global
sparsity, N = non-zero params, D = tokens, loss = eval nats per byte) and fits the law with the
tool's `report` at budgets of the dense width-64 LM's N and 1, 10, 100, 1000 times its 400-step
FLOPs. A full run (16 runs, 4,000 steps in all) took 4.3 minutes of CPU time (21 min wall on
the shared, heavily loaded 2-core machine);
`--fast` runs the FAST width-32 LM (widths 16 and 32, 2 and 4 steps) for 7 of the sweep's
points, enough for a (meaningless) fit.
"""
import itertools
import os
import tempfile
from typing import Sequence

import numpy as np

from experiments import claims
from experiments import scaling as scaling_tool
from experiments.claims import lm_runs
from experiments.configs import lm_dense
from experiments.configs import sparse_lm
from sparsejax.masks import scaling

WIDTHS, FAST_WIDTHS = (32, 64), (16, 32)
FFN_SPARSITIES = (0.0, 0.5, 0.75, 0.9)
STEPS, FAST_STEPS = (100, 400), (2, 4)
FAST_RUNS = 7  # the law's 7 params need >= 7 points
BUDGET_MULTIPLES = (1, 10, 100, 1000)  # x the FLOPs of the widest dense LM's longest run
FIT_TOLERANCE = 0.02  # RMS log residual (about 2 % of the loss) that counts as a fit
GROWTH = 0.05  # optimal sparsity must rise by this much from the smallest to the largest budget


def sweep_config(width: int, ffn_sparsity: float, steps: int, seed: int, fast: bool):
  """The trainer config of one sweep point: `lm_runs.SMALL` (or FAST) sizes at `width` (d_ff =
  4 width), dense or sparse_lm's masks at FFN density 1 - ffn_sparsity, `steps` steps."""
  sized = {"model.d_model": width, "model.d_ff": 4 * width, "train.num_steps": steps,
           "train.warmup_steps": max(1, steps // 10), "train.eval_every": steps}
  sparse = ffn_sparsity > 0
  if sparse:
    sized.update({"sparsity.density": 1.0 - ffn_sparsity,
                  "sparsity.schedule.end": max(1, 3 * steps // 4),
                  "sparsity.schedule.update_every": max(1, steps // 8)})
  factory = sparse_lm.get_config if sparse else lm_dense.get_config
  return lm_runs.configure(factory(), seed, fast, {**lm_runs.SMALL, **sized}, sized)


def budgets(runs: Sequence[dict]) -> list[tuple[float, float]]:
  """(N, C) budgets: the widest dense run's non-zero params at BUDGET_MULTIPLES of its FLOPs
  (the longest such run)."""
  dense = [r for r in runs if r["ffn_sparsity"] == 0 and r["width"] == max(x["width"]
                                                                             for x in runs)]
  ref = max(dense, key=lambda r: r["flops"])
  return [(ref["nonzero_params"], m * ref["flops"]) for m in BUDGET_MULTIPLES]


def run(seeds: Sequence[int], fast: bool) -> dict:
  points = list(itertools.product(FAST_WIDTHS if fast else WIDTHS, FFN_SPARSITIES,
                                  FAST_STEPS if fast else STEPS))
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds[:1] if fast else seeds:
      for width, ffn_sparsity, steps in points[:FAST_RUNS] if fast else points:
        workdir = os.path.join(scratch, f"w{width}_s{ffn_sparsity}_n{steps}_{seed}")
        trained = lm_runs.train_run(sweep_config(width, ffn_sparsity, steps, seed, fast),
                                    workdir)
        row = {**scaling_tool.read_run(workdir), "width": width, "ffn_sparsity": ffn_sparsity,
               "steps": steps, "seed": seed, "eval_bpb": trained["eval_bpb"],
               "wall_s": trained["wall_s"]}
        rows.append(row)
        print(f"width {width} FFN sparsity {ffn_sparsity} {steps} steps seed {seed}: S "
              f"{row['sparsity']:.3f}, N {row['nonzero_params']:.0f}, loss {row['loss']:.4f} "
              f"({row['wall_s']} s)", flush=True)
  _, results = scaling_tool.report(rows, budgets(rows))
  predicted = scaling.sparse_scaling_loss(results["fit"]["params"],
                                          *(np.array([r[k] for r in rows]) for k in (
                                              "sparsity", "nonzero_params", "tokens")))
  for row, p in zip(rows, predicted):
    row["predicted_loss"] = float(p)
  return {"runs": rows, "fit": results["fit"], "optimal_sparsity": results["optimal_sparsity"]}


def growth(payload: dict) -> tuple[bool, list[float]]:
  """(optimal sparsity non-decreasing over the growing budgets and up by >= GROWTH, the S*)."""
  optima = sorted(payload["optimal_sparsity"], key=lambda o: o["flops"])
  s = [o["sparsity"] for o in optima]
  grows = all(b >= a - 1e-3 for a, b in zip(s, s[1:])) and s[-1] - s[0] >= GROWTH
  return grows, s


def table(payload: dict) -> str:
  runs = sorted(payload["runs"], key=lambda r: (r["width"], r["ffn_sparsity"], r["steps"],
                                                r["seed"]))
  parts = [claims.markdown_table(
      ["width", "FFN sparsity", "steps", "S (global)", "non-zero params N", "tokens D",
       "eval loss (nats/byte)", "law's loss"],
      [[r["width"], f"{r['ffn_sparsity']:.2f}", r["steps"], f"{r['sparsity']:.3f}",
        f"{r['nonzero_params']:,.0f}", f"{r['tokens']:,}", f"{r['loss']:.4f}",
        f"{r['predicted_loss']:.4f}"] for r in runs])]
  fit = payload["fit"]
  parts.append(claims.markdown_table(
      list(fit["params"]) + ["RMS log residual"],
      [[f"{v:.4g}" for v in fit["params"].values()] + [f"{fit['rms_log_residual']:.4f}"]]))
  parts.append(claims.markdown_table(
      ["budget: non-zero params N", "training FLOPs C", "optimal sparsity S*", "tokens at S*",
       "law's loss at S*", "law's dense loss"],
      [[f"{o['nonzero_params']:,.0f}", f"{o['flops']:.3g}", f"{o['sparsity']:.3f}",
        f"{o['tokens']:.3g}", f"{o['loss']:.4f}", f"{o['dense_loss']:.4f}"]
       for o in sorted(payload["optimal_sparsity"], key=lambda o: o["flops"])]))
  return "\n\n".join(parts)


def judge(payload: dict) -> tuple[str, str]:
  """yes: RMS log residual < FIT_TOLERANCE and S* grows with C; no: neither; else partly."""
  rms = payload["fit"]["rms_log_residual"]
  fits = rms < FIT_TOLERANCE
  grows, s = growth(payload)
  reproduced = "yes" if fits and grows else "no" if not (fits or grows) else "partly"
  flops = sorted(o["flops"] for o in payload["optimal_sparsity"])
  b_s = payload["fit"]["params"]["b_S"]
  flat = (" (about 0: at equal non-zero params the fitted law gains nothing from sparsity)"
          if b_s < 0.05 else "")
  return reproduced, (
      f"The law fits the {len(payload['runs'])} runs with an RMS log residual of {rms:.4f} "
      f"({'below' if fits else 'above'} {FIT_TOLERANCE}); at fixed non-zero params its "
      f"optimal sparsity at {flops[0]:.2g} to {flops[-1]:.2g} training FLOPs is "
      f"{', '.join(f'{v:.2f}' for v in s)} ({'grows' if grows else 'does not grow'} with the "
      f"budget); the fitted sparsity exponent b_S = {b_s:.2g}{flat}.")


def plot(payload: dict, path: str) -> None:
  runs, params = payload["runs"], payload["fit"]["params"]
  n_grid = np.geomspace(min(r["nonzero_params"] for r in runs) * 0.8,
                        max(r["nonzero_params"] for r in runs) * 1.2, 50)
  colors = dict(zip(FFN_SPARSITIES, ("k", "tab:blue", "tab:orange", "tab:red")))
  with claims.figure(path, (6.0, 4.0), "loss vs non-zero params and the fitted L(S, N, D)\n"
                     "(squares, solid: longest runs; circles, dashed: shortest)") as ax:
    steps = sorted({r["steps"] for r in runs})
    for ffn_sparsity in sorted({r["ffn_sparsity"] for r in runs}):
      arm = [r for r in runs if r["ffn_sparsity"] == ffn_sparsity]
      color = colors.get(ffn_sparsity, "tab:gray")
      s_mean = float(np.mean([r["sparsity"] for r in arm]))
      for n_steps, style, marker in ((steps[0], "--", "o"), (steps[-1], "-", "s")):
        points = [r for r in arm if r["steps"] == n_steps]
        if not points:
          continue
        ax.plot([r["nonzero_params"] for r in points], [r["loss"] for r in points], marker,
                color=color, markersize=5)
        ax.plot(n_grid, scaling.sparse_scaling_loss(params, s_mean, n_grid, points[0]["tokens"]),
                style, color=color, linewidth=1,
                label=f"FFN sparsity {ffn_sparsity:g}" if n_steps == steps[-1] else None)
    ax.set_xscale("log")
    ax.set_xlabel("non-zero params N")
    ax.set_ylabel("eval loss (nats/byte)")
    ax.legend(fontsize=7)


CLAIM = claims.Claim(
    name="scaling_law",
    title="Sparse scaling law",
    source="Frantar, Riquelme, Houlsby, Alistarh and Evci, 2023, \"Scaling Laws for "
           "Sparsely-Connected Foundation Models\"",
    statement="The loss of sparse models follows L(S, N, D) = (a_S (1 - S)^b_S + c_S) (1/N)^b_N "
              "+ (a_D / D)^b_D + c in sparsity S, non-zero parameters N and training tokens D; "
              "from the fit, the optimal sparsity for a fixed number of non-zero parameters "
              "grows with the training budget (longer training favours larger, sparser models).",
    setup="The byte LM with 2 pre-LN blocks over 64-byte windows, batches of 16, AdamW; a sweep "
          "of widths 32 and 64 (FFN width 4x) x FFN-kernel sparsity 0 (dense), 0.5, 0.75, 0.9 "
          "(ERK over the FFN kernels, RigL updates; attention, embeddings and norms dense) x a "
          "short and a long run; each finished workdir read and fitted by `python -m "
          "experiments.scaling` (S is the global sparsity, embeddings included); optimal "
          "sparsity at the dense width-64 LM's non-zero params and 1x to 1000x its long run's "
          "FLOPs, sparse training costed as dense.",
    expected=f"RMS log residual of the fit below {FIT_TOLERANCE}, and the optimal sparsity "
             f"non-decreasing over the budgets and at least {GROWTH} higher at the largest",
    run=run, table=table, judge=judge, plot=plot, default_seeds=1, minutes=5)
