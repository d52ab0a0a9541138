"""SAE architectures on the default LM's middle residual stream: FVU, L0, dead latents, CE.

  python -m experiments.claims.sae_lm [--steps N] [--lm-workdir DIR] [--out DIR]

Runs `experiments/configs/sae_lm.py` (2048 latents on "layer_1/resid_post" of the default LM,
2^18 harvested activations, read from one shared array_record cache) once per row of
`ARCHITECTURES`, each in its own workdir under a temporary directory, exactly as
`python -m experiments.train --config=experiments/configs/sae_lm.py --config.sae.dictionary...`
would, and writes `DIR/sae_lm.json` (the final eval of every run) and `DIR/sae_lm.md` (the
table), DIR defaulting to `experiments/claims/results`. The LM is the run in --lm-workdir
(default /tmp/sparsejax_lm), trained there first when missing.
"""
import argparse
import json
import os
import tempfile
import time

from experiments import claims
from experiments import trainer
from experiments.configs import sae_lm

# (row name, sae.dictionary): every row has 2048 latents; top-k rows keep k = 16 per token; the
# JumpReLU and ReLU coefficients were chosen in 400-step probes to land near L0 = 16 (JumpReLU's
# log-threshold moves about lr per step under Adam, so it starts near its final scale).
ARCHITECTURES = (
    ("topk (AuxK)", {"kind": "topk", "k": 16}),
    ("topk without AuxK", {"kind": "topk", "k": 16, "auxk_coeff": 0.0}),
    ("batchtopk (AuxK)", {"kind": "batchtopk", "k": 16}),
    ("matryoshka topk 128/512/2048", {"kind": "topk", "k": 16, "matryoshka": (128, 512)}),
    ("jumprelu (L0 0.01, threshold from 1.0)",
     {"kind": "jumprelu", "l0_coeff": 0.01, "bandwidth": 0.05, "init_threshold": 1.0}),
    ("relu (L1 0.03)", {"kind": "relu", "l1_coeff": 0.03}),
)
COLUMNS = ("eval/fvu", "eval/l0", "eval/dead_fraction", "eval/ce_recovered", "eval/kl")


def run_architecture(dictionary: dict, steps: int | None, lm_workdir: str, cache_dir: str,
                     workdir: str) -> dict:
  """The final eval metrics of one `sae_lm.py` run with `sae.dictionary` updated."""
  config = sae_lm.get_config()
  config.sae.dictionary.update(dictionary)
  config.sae.update(lm_workdir=lm_workdir, cache_dir=cache_dir)
  if steps:
    config.train.num_steps = steps
  start = time.perf_counter()
  trainer.train(config, workdir)
  wall_s = round(time.perf_counter() - start, 1)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    final = [record for record in map(json.loads, f) if "eval/fvu" in record][-1]
  return {**{key: final[key] for key in COLUMNS}, "steps": final["step"], "wall_s": wall_s}


def table(rows: list[dict]) -> str:
  lines = ["| SAE (2048 latents) | FVU | L0 | dead % | CE recovered | KL (nats) |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['name']} | {row['eval/fvu']:.3f} | {row['eval/l0']:.1f} | "
                 f"{100 * row['eval/dead_fraction']:.1f} | {row['eval/ce_recovered']:.3f} | "
                 f"{row['eval/kl']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims.sae_lm",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None, help="SAE steps (default: the config's)")
  parser.add_argument("--lm-workdir", default="/tmp/sparsejax_lm")
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for name, dictionary in ARCHITECTURES:
      workdir = os.path.join(scratch, f"run_{len(rows)}")
      metrics = run_architecture(dictionary, args.steps, args.lm_workdir,
                                 os.path.join(scratch, "cache"), workdir)
      rows.append({"name": name, "dictionary": dictionary, **metrics})
      print(json.dumps(rows[-1]), flush=True)
  claims.write_results(args.out, "sae_lm", rows, table(rows) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
