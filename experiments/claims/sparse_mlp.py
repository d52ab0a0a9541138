"""Claim: on LeNet-300-100 / digits, RigL ≳ SET > static random masks at high sparsity.

  python -m experiments.claims.sparse_mlp [--steps N] [--seeds 0,1,2] [--out DIR]

Runs `experiments/configs/sparse_mlp.py` for dense, static, SET, RigL and SRigL at 90 % and 98 %
sparsity (ERK over the three kernels, biases dense) and 3 seeds, and writes
`DIR/sparse_mlp.json` (one row per run plus the summary) and `DIR/sparse_mlp.md` (the table of
mean ± sample std of test accuracy), DIR defaulting to `experiments/claims/results`.

Each run is exactly what `python -m experiments.train --config=experiments/configs/sparse_mlp.py:
METHOD --config.seed=SEED` computes: the same params and mask initialisation, optimizer, train
step (`trainer.make_train_step`), batch order (`loader.global_order(seed)`) and test-set
evaluation,
but the steps run as one `lax.scan` and the seeds of a (method, sparsity) as one `vmap`, so
the 27 runs take well under a minute on a 2-core CPU instead of minutes through the Python loop.
"""
import argparse
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import claims
from experiments import optim
from experiments import tasks
from experiments import trainer
from experiments.configs import sparse_mlp
from experiments.data import digits
from experiments.data import loader
from sparsejax import masks

SPARSITIES = (0.9, 0.98)
SEEDS = (0, 1, 2)


def initial_state(config: ml_collections.ConfigDict, model: nn.Module, num_features: int):
  """(train state, tx, lr schedule) as `trainer.Trainer.init_state` builds them for `config`."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = nn.meta.unbox(model.init({"params": init_rng}, jnp.zeros((1, num_features))))
  params = variables.pop("params")
  tx, schedule = optim.make_optimizer(config.train)
  if config.sparsity.enabled:
    tx, mask = optim.make_sparse_optimizer(tx, config.sparsity, jax.device_get(params),
                                           config.seed)
    params = mask.apply(params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": variables,
           "opt_state": tx.init(params), "rng": train_rng}
  return state, tx, schedule


def batch_indices(num_examples: int, seed: int, num_steps: int, batch_size: int) -> np.ndarray:
  """The trainer's training order: int [num_steps, batch_size] from `loader.global_order`."""
  order = loader.global_order(num_examples, seed)
  return np.array([order[p] for p in range(num_steps * batch_size)]).reshape(num_steps, batch_size)


def seed_configs(method: str, density: float, seeds: Sequence[int], num_steps: int | None = None,
                 overrides: dict[str, Any] | None = None) -> list[ml_collections.ConfigDict]:
  """`sparse_mlp.get_config(method)` per seed, at `density`; `num_steps` also moves the
  schedule's end to 75 % of it; `overrides` are flattened keys, e.g. {"train.batch_size": 32}."""
  configs = []
  for seed in seeds:
    config = sparse_mlp.get_config(method)
    config.seed = seed
    config.sparsity.density = density
    if num_steps is not None:
      config.train.num_steps = num_steps
      if config.sparsity.schedule.name != "none":
        config.sparsity.schedule.end = max(1, int(0.75 * num_steps))
    config.update_from_flattened_dict(overrides or {})
    configs.append(config)
  return configs


def train_seeds(method: str, density: float, seeds: Sequence[int],
                num_steps: int | None = None, overrides: dict[str, Any] | None = None):
  """Final test accuracy and mask density of `method` at `density`, one entry per seed."""
  train, test = digits.load_digits("train"), digits.load_digits("test")
  configs = seed_configs(method, density, seeds, num_steps, overrides)
  cfg = configs[0]
  task = tasks.TASKS.get("classify")(cfg)
  model = task.model
  starts = [initial_state(c, model, digits.NUM_FEATURES) for c in configs]
  _, tx, schedule = starts[0]  # same updater and schedule for every seed; masks live in the state
  sparse = cfg.sparsity.enabled
  step = trainer.make_train_step(task, tx, schedule, optim.masked_params if sparse else None)
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for s, _, _ in starts])
  idx_SNB = np.stack([batch_indices(train.num_examples, c.seed, cfg.train.num_steps,
                                    cfg.train.batch_size) for c in configs])
  inputs, labels = jnp.asarray(train.inputs), jnp.asarray(train.labels)

  def run_one(state, idx_NB):
    def body(state, idx_B):
      batch = {"inputs": inputs[idx_B], "targets": labels[idx_B],
               "weights": jnp.ones(idx_B.shape, jnp.float32)}
      state, metrics = step(state, batch)
      return state, metrics["finite/loss"] & metrics["finite/update"]

    state, finite = jax.lax.scan(body, state, idx_NB)
    weights = state["params"]
    if sparse:
      weights = optim.masked_params(weights, state["opt_state"])
    logits, _ = model.apply({"params": weights, **state["model_state"]}, jnp.asarray(test.inputs))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.labels))
    kept = (optim.density_metrics(masks.get_mask(state["opt_state"]))["density/global"]
            if sparse else jnp.ones(()))
    return accuracy, kept, jnp.all(finite)

  # Step counters are the same for every seed: left unbatched, the mask update stays a
  # `lax.cond` that runs only on schedule steps (batched, it would run on every step).
  state_axes = jax.tree_util.tree_map_with_path(lambda p, _: None if _is_step(p) else 0, state)
  state = jax.tree_util.tree_map_with_path(lambda p, x: x[0] if _is_step(p) else x, state)
  accuracy, realised, finite = jax.jit(jax.vmap(run_one, in_axes=(state_axes, 0)))(
      state, jnp.asarray(idx_SNB))
  if not np.all(finite):
    raise trainer.NonFiniteLossError(f"{method} at density {density}: a loss went non-finite")
  return [{"method": method, "sparsity": round(1 - density, 4) if sparse else 0.0, "seed": seed,
           "test_accuracy": float(a), "density": float(d)}
          for seed, a, d in zip(seeds, accuracy, realised)]


def _is_step(path) -> bool:
  """Whether a key path ends in a step counter (the train state's or the mask wrapper's)."""
  last = path[-1] if path else None
  return getattr(last, "key", getattr(last, "name", None)) == "step"


def summarize(rows: list[dict]) -> list[dict]:
  """Mean and sample std (ddof=1) of test accuracy per (method, sparsity)."""
  groups: dict[tuple[str, float], list[float]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["sparsity"]), []).append(r["test_accuracy"])
  return [{"method": m, "sparsity": s, "mean": float(np.mean(a)),
           "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0, "runs": len(a)}
          for (m, s), a in groups.items()]


def markdown_table(summary: list[dict]) -> str:
  """Rows: methods; columns: sparsities; cells: mean ± std test accuracy in %."""
  cell = {(r["method"], r["sparsity"]): r for r in summary}
  lines = ["| method | " + " | ".join(f"{s:.0%} sparse" for s in SPARSITIES) + " |",
           "|---|" + "---|" * len(SPARSITIES)]
  for method in sparse_mlp.METHODS:
    if method == "dense":
      r = cell[("dense", 0.0)]
      text = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
      lines.append(f"| dense (0 % sparse) | " + " | ".join([text] * len(SPARSITIES)) + " |")
      continue
    cells = [cell.get((method, s)) for s in SPARSITIES]
    lines.append(f"| {method} | " + " | ".join(
        f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if r else "-" for r in cells) + " |")
  return "\n".join(lines)


def run(seeds: Sequence[int] = SEEDS, num_steps: int | None = None,
        sparsities: Sequence[float] = SPARSITIES) -> tuple[list[dict], list[dict]]:
  """(rows, summary) over every method and sparsity."""
  rows = train_seeds("dense", 1.0, seeds, num_steps)
  for sparsity in sparsities:
    for method in sparse_mlp.METHODS[1:]:
      clock = time.perf_counter()
      rows += train_seeds(method, round(1 - sparsity, 6), seeds, num_steps)
      accuracies = [round(r["test_accuracy"], 4) for r in rows[-len(seeds):]]
      print(f"{method} at {sparsity:.0%}: {accuracies} ({time.perf_counter() - clock:.1f} s)",
            flush=True)
  return rows, summarize(rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims.sparse_mlp",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--steps", type=int, default=None, help="training steps (config default)")
  parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  args = parser.parse_args(argv)
  clock = time.perf_counter()
  rows, summary = run([int(s) for s in args.seeds.split(",")], args.steps)
  table = markdown_table(summary)
  claims.write_results(args.out, "sparse_mlp", {
      "runs": rows, "summary": summary, "num_steps": args.steps or sparse_mlp.NUM_STEPS,
      "wall_s": round(time.perf_counter() - clock, 1)}, table + "\n")
  print(table)
  print(f"total {time.perf_counter() - clock:.1f} s")


if __name__ == "__main__":
  main()
