"""Top-k and predicted sparse FFNs vs the dense FFN on the default LM, at equal steps.

  python -m experiments.claims.activation_ffn [--steps N] [--out DIR] [--fast]

Trains experiments/configs/lm_dense.py, topk_ffn_lm.py and predicted_ffn_lm.py (10 % of the
hidden units active per token) for the same number of steps (default: lm_dense.py's 400), each
exactly as `python -m experiments.train --config=...` would, in its own workdir under a
temporary directory, and writes `DIR/activation_ffn.json` (one row per FFN: final eval/bpb,
active fraction and, for "predicted", the predictor's recall of the true top-k, both averaged
over layers from the last logged training window) and `DIR/activation_ffn.md` (the table), DIR
defaulting to experiments/claims/results. About 10-12 minutes on an idle 2-core CPU.
`--fast` is a smoke run (a 1-layer 32-wide LM, 2 steps of 4 x 32 bytes, one eval batch); give it
an --out of its own, its numbers mean nothing.
"""
import argparse
import json
import os
import tempfile
import time

import ml_collections
import numpy as np

from experiments import claims
from experiments import metrics
from experiments import trainer
from experiments.configs import lm_dense
from experiments.configs import predicted_ffn_lm
from experiments.configs import topk_ffn_lm

RUNS = (("dense", lm_dense), ("topk", topk_ffn_lm), ("predicted", predicted_ffn_lm))
FAST = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.d_ff": 64,
        "train.batch_size": 4, "train.seq_len": 32, "train.eval_batches": 1,
        "train.log_every": 1, "train.eval_every": 2, "train.warmup_steps": 1}


def run_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`final_metrics` of one training run of `config` in `workdir`, plus its wall seconds."""
  start = time.perf_counter()
  trainer.train(config, workdir)
  wall_s = round(time.perf_counter() - start, 1)
  return {**final_metrics(metrics.read_metrics(workdir)), "wall_s": wall_s}


def final_metrics(records: list[dict]) -> dict:
  """The last eval/bpb and its step, and the layer means of ffn/active_fraction (1.0 when no
  layer logs it: dense) and ffn/recall (None when none does) in the last training record."""
  final_eval = [r for r in records if "eval/bpb" in r][-1]
  final_train = [r for r in records if "train/loss" in r][-1]
  row = {"eval/bpb": final_eval["eval/bpb"], "steps": final_eval["step"]}
  for name, default in (("active_fraction", 1.0), ("recall", None)):
    values = [v for k, v in final_train.items()
              if k.startswith("train/layer_") and k.endswith(f"/ffn/{name}")]
    row[name] = float(np.mean(values)) if values else default
  return row


def table(rows: list[dict]) -> str:
  lines = ["| FFN (default LM) | eval bpb | active fraction | predictor recall | steps |",
           "|---|---|---|---|---|"]
  for row in rows:
    recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
    lines.append(f"| {row['name']} | {row['eval/bpb']:.3f} | {row['active_fraction']:.3f} | "
                 f"{recall} | {row['steps']} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims.activation_ffn",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=lm_dense.get_config().train.num_steps)
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  parser.add_argument("--fast", action="store_true", help="tiny smoke run (2 steps)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps={args.steps} must be >= 1")
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for name, module in RUNS:
      config = module.get_config()
      config.train.num_steps = 2 if args.fast else args.steps
      if args.fast:
        config.update_from_flattened_dict(FAST)
      metrics_row = run_config(config, os.path.join(scratch, name))
      rows.append({"name": name, "ffn": config.model.ffn.to_dict(), **metrics_row})
      print(json.dumps(rows[-1]), flush=True)
  claims.write_results(args.out, "activation_ffn", rows, table(rows) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
