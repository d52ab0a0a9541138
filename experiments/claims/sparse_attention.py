"""Sparse attention patterns on the default LM at equal steps: eval bpb against attended fraction.

  python -m experiments.claims.sparse_attention [--steps N] [--fast] [--only a,b] [--out DIR]

Trains `experiments/configs/lm_dense.py` (3 layers, 4 heads, 400 steps of 32 x 128 bytes of the
embedded corpus) once per row of `ATTENTIONS`, with only `model.attention` changed, exactly as
`python -m experiments.train --config=experiments/configs/lm_dense.py --config.model.attention...`
would, each in its own workdir under a temporary directory; writes, after every run,
`DIR/sparse_attention.json` (per run: final eval/bpb, attended fraction, wall time) and
`DIR/sparse_attention.md` (the table of the runs so far), DIR defaulting to
`experiments/claims/results`. The attended fraction is the mean over layers of the last logged
layer_*/attention/attended_fraction (mean over queries of attended / causal keys; 1 for dense
attention). --fast: 20 steps of 8 x 128, 2 eval batches (a smoke run). With --only, the rows of the other
patterns already in DIR are kept.
In the spirit of Nawrot et al. 2025, "The Sparse Frontier: Sparse Attention Trade-offs in
Transformer LLMs" (quality against the fraction of attention computed, at equal training).
"""
import argparse
import json
import os
import tempfile
import time

from experiments import claims
from experiments import trainer
from experiments.configs import lm_dense

_BLOCK = {"name": "block_sparse", "block": 16}
# (key, row name, model.attention); block-sparse rows cut the 128 positions into blocks of 16.
ATTENTIONS = (
    ("dense", "dense", {"name": "dense"}),
    ("window_global", "window 32 + 16 global tokens (sparse_attn_lm.py)",
     {**_BLOCK, "pattern": "window_global", "window": 32, "num_global": 16}),
    ("routing", "routing: window 16 + 4 k-means clusters (routing_attn_lm.py)",
     {"name": "routing", "num_clusters": 4, "window": 16}),
    ("window", "window (last 32 keys)", {**_BLOCK, "pattern": "window", "window": 32}),
    ("strided", "strided (stride 16)", {**_BLOCK, "pattern": "strided", "stride": 16}),
    ("fixed", "fixed (stride 32, summary 4)",
     {**_BLOCK, "pattern": "fixed", "stride": 32, "summary": 4}),
    ("bigbird", "bigbird (window 32, 16 global, 1 random block)",
     {**_BLOCK, "pattern": "bigbird", "window": 32, "num_global": 16, "num_random": 1}),
    ("entmax", "entmax (alpha per head)", {"name": "entmax", "normalizer": "entmax"}),
)
FRACTION_SUFFIX = "/attention/attended_fraction"


def run_attention(attention: dict, steps: int | None, fast: bool, workdir: str) -> dict:
  """Final eval/bpb, mean attended fraction and wall time of one lm_dense.py run with
  `model.attention` replaced."""
  config = lm_dense.get_config()
  config.model.attention.update(attention)
  if fast:
    config.train.update(num_steps=20, batch_size=8, eval_batches=2, eval_every=20, log_every=10,
                        warmup_steps=5)
  if steps:
    config.train.update(num_steps=steps, eval_every=min(config.train.eval_every, steps))
  start = time.perf_counter()
  trainer.train(config, workdir)
  wall_s = round(time.perf_counter() - start, 1)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if "eval/bpb" in r][-1]
  fractions = [r for r in records if any(k.endswith(FRACTION_SUFFIX) for k in r)]
  fraction = 1.0
  if fractions:
    values = [v for k, v in fractions[-1].items()
              if k.startswith("train/") and k.endswith(FRACTION_SUFFIX)]
    fraction = sum(values) / len(values)
  return {"eval/bpb": final["eval/bpb"], "attended_fraction": round(fraction, 4),
          "steps": final["step"], "batch_size": config.train.batch_size, "wall_s": wall_s}


def table(rows: list[dict]) -> str:
  lines = [f"Default LM, {rows[0]['steps']} steps of {rows[0]['batch_size']} x 128 bytes, one run "
           "per row.", "",
           "| attention | eval bpb | attended fraction | wall s |", "|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['name']} | {row['eval/bpb']:.3f} | {row['attended_fraction']:.3f} | "
                 f"{row['wall_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims.sparse_attention",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None, help="steps (default: lm_dense.py's)")
  parser.add_argument("--fast", action="store_true", help="20 steps of 8 x 128: a smoke run")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated subset of {','.join(k for k, _, _ in ATTENTIONS)}")
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  args = parser.parse_args(argv)
  keys = [k for k, _, _ in ATTENTIONS]
  chosen = keys if args.only is None else args.only.split(",")
  unknown = sorted(set(chosen) - set(keys))
  if unknown:
    parser.error(f"--only {','.join(unknown)}: allowed {','.join(keys)}")
  kept = previous_rows(args.out) if args.only else {}
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for key, name, attention in ATTENTIONS:
      if key not in chosen:
        continue
      metrics = run_attention(attention, args.steps, args.fast, os.path.join(scratch, key))
      kept[key] = {"key": key, "name": name, "attention": attention, **metrics}
      print(json.dumps(kept[key]), flush=True)
      rows = [kept[k] for k in keys if k in kept]
      claims.write_results(args.out, "sparse_attention", rows, table(rows) + "\n")
  print(table(rows))


def previous_rows(out_dir: str) -> dict[str, dict]:
  """The rows of an earlier run in OUT_DIR by key (none when there is no earlier run), so a run
  with --only replaces its own rows and keeps the others."""
  path = os.path.join(out_dir, "sparse_attention.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {row["key"]: row for row in json.load(f)}


if __name__ == "__main__":
  main()
