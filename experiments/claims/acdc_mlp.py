"""Claim: on LeNet-300-100 / digits at 90 % sparsity, AC/DC ≳ gradual magnitude pruning ≳ RigL.

  python -m experiments.claims.acdc_mlp [--steps N] [--seeds 0,1,2] [--out DIR] [--fast]

Runs `experiments/configs/sparse_mlp.py` (through `experiments.claims.sparse_mlp.train_seeds`:
the trainer's train step, batch order and test evaluation, seeds vmapped) with three methods,
all ending at 90 % sparsity of the kernels:
  rigl  the sparse_mlp config (ERK random start, cosine drop fraction 0.3 every 50 steps);
  gmp   dense start, per-layer magnitude pruning to the same ERK densities on the polynomial
        schedule (Zhu & Gupta 2017) from 10 % to 75 % of training;
  acdc  dense start, AC/DC phases (Peste et al. 2021): dense warm-up 10 %, then sparse / dense
        phases of 5 % each, sparse from about 80 % of training on; per-layer magnitude masks at
        the ERK densities (a global ranking right after the short warm-up empties the 300x100
        layer, whose initial weights are the smallest).
Config-driven AC/DC resets the Adam moments only where the mask changes (`wrap`), not the whole
state, and keeps the run's warmup-cosine learning rate (no rewinding); the full recipe is
`sparsejax.masks.acdc` (reset Adam state, `rewind_lr`), which `experiments/optim.py` does not
build yet.
Writes DIR/acdc_mlp.json and DIR/acdc_mlp.md (mean ± sample std of test accuracy); `--fast`
(200 steps, seed 0; about 40 s on a busy 2-core CPU: rigl 89.4, gmp 94.4, acdc 93.0 %) only
prints. The full run (1500 steps, 3 seeds) has not been run yet.
"""
import argparse
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import claims
from experiments import tasks
from experiments.claims import sparse_mlp as sparse_mlp_claim
from experiments.configs import sparse_mlp
from experiments.data import digits
from sparsejax import masks

SPARSITY = 0.9
METHODS = ("rigl", "gmp", "acdc")


def erk_densities() -> tuple[tuple[str, float], ...]:
  """((path, density), ...) of the sparse_mlp kernels under ERK at 1 - SPARSITY (biases dense)."""
  config = sparse_mlp.get_config("rigl")
  model = tasks.TASKS.get("classify")(config).model
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, digits.NUM_FEATURES)))["params"]
  densities = masks.layer_densities(nn.meta.unbox(shapes), 1 - SPARSITY, "erk")
  return tuple((path, d) for path, d in densities.items() if path.endswith("kernel"))


def overrides(method: str, num_steps: int) -> dict:
  """Flattened config overrides turning the sparse_mlp "rigl" config into `method`."""
  if method == "rigl":
    return {}
  densities = erk_densities()
  unit = max(1, num_steps // 20)  # 5 % of training
  begin = 2 * unit
  if method == "gmp":
    end = begin + unit * ((3 * num_steps // 4 - begin) // unit)
    schedule = {"name": "polynomial", "final_sparsity": SPARSITY, "begin": begin, "end": end,
                "update_every": unit}
    updater = {"name": "magnitude", "densities": densities}
  else:
    end = begin + 2 * unit * ((4 * num_steps // 5 - begin) // (2 * unit))
    schedule = {"name": "acdc", "sparsity": SPARSITY, "begin": begin, "phase_steps": unit,
                "end": end}
    updater = {"name": "acdc", "densities": densities}
  return {"sparsity.density": 1.0, "sparsity.updater": ml_collections.ConfigDict(updater),
          "sparsity.schedule": ml_collections.ConfigDict(schedule)}


def run(seeds: Sequence[int], num_steps: int) -> tuple[list[dict], list[dict]]:
  """(rows, summary): one row per (method, seed) with test accuracy and realised density."""
  rows = []
  for method in METHODS:
    clock = time.perf_counter()
    method_rows = sparse_mlp_claim.train_seeds("rigl", round(1 - SPARSITY, 6), seeds, num_steps,
                                               overrides(method, num_steps))
    for row in method_rows:
      row["method"] = method
    rows += method_rows
    print(f"{method}: accuracy {[round(r['test_accuracy'], 4) for r in method_rows]}, density "
          f"{[round(r['density'], 4) for r in method_rows]} ({time.perf_counter() - clock:.1f} s)",
          flush=True)
  return rows, sparse_mlp_claim.summarize(rows)


def markdown_table(summary: list[dict]) -> str:
  lines = ["| method (90 % sparse) | test accuracy % |", "|---|---|"]
  lines += [f"| {r['method']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} |" for r in summary]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims.acdc_mlp",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--steps", type=int, default=sparse_mlp.NUM_STEPS)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  parser.add_argument("--fast", action="store_true", help="200 steps, seed 0, nothing written")
  args = parser.parse_args(argv)
  steps, seeds = (200, [0]) if args.fast else (args.steps, [int(s) for s in args.seeds.split(",")])
  clock = time.perf_counter()
  rows, summary = run(seeds, steps)
  table = markdown_table(summary)
  if not np.allclose([r["density"] for r in rows], 1 - SPARSITY, atol=0.01):
    raise AssertionError(f"a run did not end at {SPARSITY:.0%} sparsity: {rows}")
  if not args.fast:
    claims.write_results(args.out, "acdc_mlp", {
        "runs": rows, "summary": summary, "num_steps": steps,
        "wall_s": round(time.perf_counter() - clock, 1)}, table + "\n")
  print(table)
  print(f"total {time.perf_counter() - clock:.1f} s")


if __name__ == "__main__":
  main()
