"""Sparse NAS: random search over per-layer density vectors at a fixed non-zero budget.

  python -m experiments.sparse_nas --config=experiments/configs/sparse_mlp.py:static \\
      --trials 24 --steps 300 --budget 0.05 [--seeds 2] [--dass_steps 300] [--json FILE]
      [--config.a.b=V ...]

Every candidate keeps exactly K = round(budget · Σ_l n_l) weights over the sparsified leaves
(n_l entries each): per-layer counts c_l ∈ [1, n_l] with Σ_l c_l = K. Random candidates draw
relative densities r_l = spread^u_l, u_l ~ U(−1, 1), scale them to the budget with ERK-style
capping (c_l = min(n_l, ε r_l n_l), ε solved for Σ c_l = K) and round by largest remainder
(`sample_counts`); ERK and uniform (`masks.layer_densities`) run beside them as baselines,
and with `--dass_steps` the per-layer counts of a DASS mask (`sparsejax.masks.dass`: relaxed
mask logits searched bilevel on the training / validation rows, one global top-k).
Each candidate trains for `--steps` steps per seed through the trainer's train step
(`trainer.make_train_step`, the config's optimizer, mask init, updater and schedule; the mask
built with the candidate's per-layer densities as `make_sparse_optimizer` overrides) on the
training split minus a held-out validation part; candidates are ranked by mean validation
accuracy, and the test accuracy is printed beside it. All candidates and seeds run as one
`vmap` of a `lax.scan`, one compilation. Needs a "classify" config (digits or a TFDS image set)
whose updater keeps per-layer counts (static, SET, RigL, ...: not a pruning schedule).

With `--safs_steps N` it then runs SAFS at the best density vector: `safs.lahc_search` over
the hidden layers' activations (from all-ReLU), each choice trained like a candidate with the
model "safs_mlp" (learned per-layer scales α, β) and scored by mean validation accuracy.

Measured on a 2-core CPU shared with other jobs (LeNet-300-100 / digits, `sparse_mlp.py:static`,
95 % sparse, 24 trials + ERK + uniform + DASS (300 search steps), 300 steps x 2 seeds each, then
12 SAFS steps): 7 minutes. ERK and the best random vector tie on validation accuracy (89.93 %;
test 88.02 / 89.42 %), the DASS allocation is 5th (86.98 %), uniform 11th (68.06 %); SAFS at
ERK's densities: relu / selu 93.40 % vs all-ReLU (learned scales) 93.06 % validation. Rows:
`experiments/results/sparse_nas_digits.json`.
"""
import argparse
import json
import math
import re
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import optim
from experiments import run_config
from experiments import tasks
from experiments import trainer
from experiments.claims import markdown_table
from experiments.claims import sparse_mlp as sparse_mlp_claim
from sparsejax import masks
from sparsejax.masks import safs
from sparsejax.registry import UPDATERS


def integer_counts(ideal: Sequence[float], sizes: Sequence[int], total: int) -> np.ndarray:
  """Integers c_l ∈ [1, n_l] with Σ c_l = total exactly, rounded from `ideal` by largest
  remainder (units added where ideal − c is largest, removed where it is smallest)."""
  ideal, sizes = np.asarray(ideal, np.float64), np.asarray(sizes, np.int64)
  if not len(sizes) <= total <= sizes.sum():
    raise ValueError(f"total={total} kept weights must be in [{len(sizes)}, {sizes.sum()}] "
                     f"(at least one per layer, at most every weight)")
  counts = np.clip(np.floor(ideal + 1e-9), 1, sizes).astype(np.int64)
  while (left := total - counts.sum()) != 0:
    room = counts < sizes if left > 0 else counts > 1
    gap = np.where(room, (ideal - counts) * np.sign(left), -np.inf)
    order = np.argsort(-gap, kind="stable")[:min(abs(left), int(room.sum()))]
    counts[order] += np.sign(left)
  return counts


def capped_counts(ratios: Sequence[float], sizes: Sequence[int], total: int) -> np.ndarray:
  """Ideal counts min(n_l, ε r_l n_l) with ε solved so that they sum to `total` (ERK capping)."""
  ratios, sizes = np.asarray(ratios, np.float64), np.asarray(sizes, np.float64)
  capped = np.zeros(len(sizes), bool)
  while not capped.all():
    eps = (total - sizes[capped].sum()) / (ratios * sizes)[~capped].sum()
    newly = ~capped & (eps * ratios > 1.0)
    if not newly.any():
      return np.where(capped, sizes, eps * ratios * sizes)
    capped |= newly
  return sizes


def sample_counts(sizes: Sequence[int], total: int, rng: np.random.Generator,
                  spread: float = 10.0) -> np.ndarray:
  """Random per-layer counts c_l ∈ [1, n_l], Σ c_l = total: r_l = spread^u_l, u_l ~ U(−1, 1),
  `capped_counts` then `integer_counts`."""
  if spread < 1:
    raise ValueError(f"spread must be >= 1, got {spread}")
  ratios = spread ** rng.uniform(-1.0, 1.0, size=len(sizes))
  return integer_counts(capped_counts(ratios, sizes, total), sizes, total)


def sparse_sizes(params: Any, rules: Sequence[tuple[str, Any]] = ()) -> dict[str, int]:
  """{path: entries} of the sparsified leaves (all must be "unstructured")."""
  sizes = {}
  for path, (name, _) in masks.leaf_structures(params, rules).items():
    if name == masks.DENSE:
      continue
    if name != "unstructured":
      raise ValueError(f"sparse NAS samples unstructured densities; leaf {path!r} is {name!r}")
    sizes[path] = math.prod(masks.leaves_by_path(params)[path].shape)
  return sizes


def candidates(params: Any, budget: float, trials: int, seed: int, spread: float,
               rules: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, dict[str, int]]]:
  """[(name, {path: count})]: "erk", "uniform", then "random_i" for i < trials."""
  sizes = sparse_sizes(params, rules)
  paths, n = list(sizes), np.array(list(sizes.values()))
  total = int(round(budget * n.sum()))
  out = []
  for name in ("erk", "uniform"):
    densities = masks.layer_densities(params, budget, name, rules=rules)
    out.append((name, {p: int(round(densities[p] * sizes[p])) for p in paths}))
  rng = np.random.default_rng(seed)
  for i in range(trials):
    out.append((f"random_{i}", dict(zip(paths, map(int, sample_counts(n, total, rng, spread))))))
  return out


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.task != "classify" or not config.sparsity.enabled:
    raise ValueError(f"sparse NAS needs a classify config with sparsity enabled; got "
                     f"task={config.task!r}, sparsity.enabled={config.sparsity.enabled}")
  if UPDATERS.get(config.sparsity.updater.name).consumes == "sparsity":
    raise ValueError(f"config.sparsity.updater={config.sparsity.updater.name!r} prunes to "
                     f"per-layer densities of its own; use one that keeps per-layer counts "
                     f"(static, set, rigl, ...)")
  if masks.init_needs(config.sparsity.init) != "params":
    raise ValueError(f"config.sparsity.init={config.sparsity.init!r} needs gradients; sparse "
                     f"NAS scores masks from params alone (random, magnitude)")


def _split(num_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, validation rows) of the training split: a fixed seeded permutation."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  order = np.random.default_rng(0).permutation(num_examples)
  num_val = int(round(val_fraction * num_examples))
  return np.sort(order[num_val:]), np.sort(order[:num_val])


def _initial_state(config, task, init, tx, seed: int, counts: dict[str, int]):
  """(state, wrapped tx) as `sparse_mlp_claim.initial_state`, the mask at the given counts."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = nn.meta.unbox(init({"params": init_rng}, task.init_inputs()))
  params = variables.pop("params")
  sizes = {p: np.prod(np.shape(w)) for p, w in masks.leaves_by_path(params).items()}
  overrides = {f"^{re.escape(p)}$": c / sizes[p] for p, c in counts.items()}
  sparse_tx, mask = optim.make_sparse_optimizer(tx, config.sparsity, jax.device_get(params),
                                                seed, overrides=overrides)
  params = mask.apply(params)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": variables,
          "opt_state": sparse_tx.init(params), "rng": train_rng}, sparse_tx


def _eval_arrays(task) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(inputs, targets, weights) of the task's eval split, padding rows weighted 0."""
  cat = lambda key: jnp.asarray(np.concatenate([b[key] for b in task.eval_batches]))
  return cat("inputs"), cat("targets"), cat("weights")


def train_candidates(config: ml_collections.ConfigDict, task: Any,
                     cands: list[tuple[str, dict[str, int]]], seeds: Sequence[int],
                     val_fraction: float = 0.2) -> list[dict]:
  """Per candidate: validation and test accuracy per seed after `config.train.num_steps` steps,
  and the realised kept count per layer (which must equal the candidate's counts)."""
  steps = config.train.num_steps
  source = task.train_source
  train_rows, val_rows = _split(source.num_examples, val_fraction)
  tx, lr = optim.make_optimizer(config.train, config.sparsity)
  init = jax.jit(task.model.init)
  starts = [_initial_state(config, task, init, tx, seed, counts)
            for _, counts in cands for seed in seeds]
  step = trainer.make_train_step(task, starts[0][1], lr, optim.masked_params)
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for s, _ in starts])
  idx_RNB = np.stack([train_rows[sparse_mlp_claim.batch_indices(
      len(train_rows), seed, steps, config.train.batch_size)] for _ in cands for seed in seeds])
  inputs, labels = jnp.asarray(source.inputs), jnp.asarray(source.labels)
  val_x, val_y = inputs[val_rows], labels[val_rows]
  test_x, test_y, test_w = _eval_arrays(task)

  train_steps = sparse_mlp_claim.scan_steps(step, inputs, labels)

  def run_one(state, idx_NB):
    state, finite = train_steps(state, idx_NB)
    weights = optim.masked_params(state["params"], state["opt_state"])
    variables = {"params": weights, **state["model_state"]}
    val_logits, _ = task.model.apply(variables, val_x)
    test_logits, _ = task.model.apply(variables, test_x)
    val_acc = jnp.mean(jnp.argmax(val_logits, -1) == val_y)
    test_acc = jnp.sum((jnp.argmax(test_logits, -1) == test_y) * test_w) / jnp.sum(test_w)
    mask = masks.get_mask(state["opt_state"]).flat()
    kept = {p: jnp.sum(mask[p], dtype=jnp.int32) for p in cands[0][1]}
    return val_acc, test_acc, kept, finite

  val, test, kept, finite = jax.device_get(
      sparse_mlp_claim.vmap_runs(run_one, state, jnp.asarray(idx_RNB)))
  if not np.all(finite):
    raise trainer.NonFiniteLossError("sparse NAS: a trial's loss went non-finite")
  k = len(seeds)
  return [{"name": name, "counts": counts, "kept": {p: int(kept[p][i * k]) for p in counts},
           "seeds": list(seeds), "val_accuracy": [float(v) for v in val[i * k:(i + 1) * k]],
           "test_accuracy": [float(v) for v in test[i * k:(i + 1) * k]]}
          for i, (name, counts) in enumerate(cands)]


def _prepared(config: ml_collections.ConfigDict, budget: float,
              steps: int) -> ml_collections.ConfigDict:
  """A checked copy of `config` at density `budget`, `steps` steps (schedule ending at 75 %)."""
  _check_config(config)
  config = ml_collections.ConfigDict(config.to_dict())
  config.sparsity.density = budget
  config.train.num_steps = steps
  if config.sparsity.schedule.name != "none":
    config.sparsity.schedule.end = max(1, int(0.75 * steps))
  return config


def dass_counts(config: ml_collections.ConfigDict, task: Any, budget: float, steps: int,
                val_fraction: float, rules: Sequence[tuple[str, Any]] = ()) -> dict[str, int]:
  """Per-layer kept counts of a DASS mask (`masks.dass_search`, `steps` bilevel steps: weights
  on the training rows, mask logits on the validation rows, params and batch order of seed 0),
  discretised by one global top-k at `budget`."""
  source = task.train_source
  variables = nn.meta.unbox(jax.jit(task.model.init)(jax.random.PRNGKey(0), task.init_inputs()))
  params = variables.pop("params")
  grad_fn = jax.grad(lambda p, b: trainer.objective(task, p, variables, b, deterministic=True)[0])

  def batches(rows):
    idx_NB = rows[sparse_mlp_claim.batch_indices(len(rows), 0, steps, config.train.batch_size)]
    return [{"inputs": jnp.asarray(source.inputs[idx]), "targets": jnp.asarray(source.labels[idx]),
             "weights": jnp.ones(idx.shape, jnp.float32)} for idx in idx_NB]

  train_rows, val_rows = _split(source.num_examples, val_fraction)
  result = masks.dass_search(grad_fn, params, batches(train_rows), batches(val_rows), budget,
                             rules=rules, weight_tx=optax.adam(config.train.learning_rate))
  nnz = result.mask.nnz()
  return {p: nnz[p] for p in sparse_sizes(params, rules)}


def search(config: ml_collections.ConfigDict, trials: int, steps: int, budget: float,
           seeds: Sequence[int], seed: int = 0, spread: float = 10.0, val_fraction: float = 0.2,
           dass_steps: int = 0) -> list[dict]:
  """ERK, uniform, with `dass_steps` > 0 the DASS allocation (`dass_counts`), and `trials`
  random density vectors at `budget`, each trained `steps` steps per seed
  (`train_candidates`), ranked by mean validation accuracy; rows carry "densities"."""
  config = _prepared(config, budget, steps)
  task = tasks.TASKS.get("classify")(config)
  params = nn.meta.unbox(jax.eval_shape(task.model.init, jax.random.PRNGKey(0),
                                        task.init_inputs()))["params"]
  rules = tuple((p, s.to_dict() if hasattr(s, "to_dict") else s) for p, s in config.sparsity.rules)
  sizes = sparse_sizes(params, rules)
  cands = candidates(params, budget, trials, seed, spread, rules)
  if dass_steps > 0:
    cands.insert(2, ("dass", dass_counts(config, task, budget, dass_steps, val_fraction, rules)))
  rows = train_candidates(config, task, cands, seeds, val_fraction)
  for row in rows:
    row["densities"] = {p: c / sizes[p] for p, c in row["counts"].items()}
  return rank(rows)


MLP_CLASSIFIERS = ("lenet_300_100", "mlp", "safs_mlp")


def safs_search(config: ml_collections.ConfigDict, counts: dict[str, int], lahc_steps: int,
                steps: int, seeds: Sequence[int], seed: int = 0,
                val_fraction: float = 0.2) -> tuple[Any, dict[tuple[str, ...], dict]]:
  """SAFS on the sparse MLP at per-layer `counts`: `safs.lahc_search` over the hidden layers'
  operators from all-ReLU, each choice scored by the mean validation accuracy of a `steps`-step
  run per seed (model "safs_mlp", α and β learned in the run: SAFS stage 2 inside each score).
  Returns the search result and the `train_candidates` row of every scored choice."""
  name = config.classifier.name
  if name not in MLP_CLASSIFIERS:
    raise ValueError(f"SAFS search needs an MLP classifier ({', '.join(MLP_CLASSIFIERS)}), "
                     f"got {name!r}")
  hidden = tuple(config.classifier.get("hidden", (300, 100)))  # MLP's and LeNet's default
  config = _prepared(config, config.sparsity.density, steps)
  rows = {}

  def score(ops: tuple[str, ...]) -> float:
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.classifier = ml_collections.ConfigDict(
        {"name": "safs_mlp", "hidden": hidden, "activations": ops, "learn_scale": True})
    task = tasks.TASKS.get("classify")(trial)
    rows[ops] = train_candidates(trial, task, [("+".join(ops), counts)], seeds, val_fraction)[0]
    return float(np.mean(rows[ops]["val_accuracy"]))

  return safs.lahc_search(score, ("relu",) * len(hidden), lahc_steps, seed=seed), rows


def rank(rows: list[dict]) -> list[dict]:
  """Rows sorted by mean validation accuracy (best first; ties, to float32 precision, keep
  their order, so a baseline listed first wins them)."""
  return sorted(rows, key=lambda r: -round(float(np.mean(r["val_accuracy"])), 6))


def table(rows: list[dict]) -> str:
  """Markdown: rank, candidate, per-layer densities (%), mean val / test accuracy (%)."""
  paths = list(rows[0]["densities"])
  body = [[i + 1, r["name"], " / ".join(f"{100 * r['densities'][p]:.1f}" for p in paths),
           f"{100 * np.mean(r['val_accuracy']):.2f}", f"{100 * np.mean(r['test_accuracy']):.2f}"]
          for i, r in enumerate(rows)]
  return markdown_table(["rank", "candidate", "density % (" + ", ".join(paths) + ")",
                         "val acc %", "test acc %"], body)


def summary(rows: list[dict]) -> str:
  """One line each for the best random vector, ERK, uniform and (when run) DASS."""
  best = next(r for r in rows if r["name"].startswith("random_"))
  by_name = {r["name"]: r for r in rows}
  lines = []
  named = [("best random", best)] + [(n, by_name[n]) for n in ("erk", "uniform", "dass")
                                     if n in by_name]
  for label, r in named:
    rank_of = rows.index(r) + 1
    lines.append(f"{label:>11} ({r['name']}, rank {rank_of}): val "
                 f"{100 * np.mean(r['val_accuracy']):.2f} %, test "
                 f"{100 * np.mean(r['test_accuracy']):.2f} %, densities "
                 + ", ".join(f"{p} {100 * d:.2f} %" for p, d in r["densities"].items()))
  return "\n".join(lines)


def safs_table(candidate: str, result: Any, scored: dict[tuple[str, ...], dict]) -> str:
  """Markdown: every scored activation choice by mean validation accuracy, then the best."""
  order = sorted(scored, key=lambda ops: -round(float(np.mean(scored[ops]["val_accuracy"])), 6))
  body = [[i + 1, " / ".join(ops), f"{100 * np.mean(scored[ops]['val_accuracy']):.2f}",
           f"{100 * np.mean(scored[ops]['test_accuracy']):.2f}"] for i, ops in enumerate(order)]
  relu = scored[("relu",) * len(result.best)]
  return (f"SAFS at the densities of {candidate} ({len(result.trace)} LAHC steps):\n"
          + markdown_table(["rank", "activations", "val acc %", "test acc %"], body)
          + f"\nbest {' / '.join(result.best)}: val {100 * result.best_score:.2f} % vs all-ReLU "
            f"{100 * np.mean(relu['val_accuracy']):.2f} %")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.sparse_nas",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="classify config FILE[:ARG], e.g. experiments/configs/sparse_mlp.py:static")
  parser.add_argument("--trials", type=int, default=16, help="random density vectors to try")
  parser.add_argument("--steps", type=int, default=300, help="training steps per trial")
  parser.add_argument("--budget", type=float, default=0.05,
                      help="kept fraction over the sparsified leaves")
  parser.add_argument("--seeds", type=int, default=2, help="training seeds 0..N-1 per candidate")
  parser.add_argument("--seed", type=int, default=0, help="seed of the density-vector sampler")
  parser.add_argument("--spread", type=float, default=10.0,
                      help="relative per-layer densities within [1/s, s]")
  parser.add_argument("--val_fraction", type=float, default=0.2,
                      help="fraction of the training split held out for ranking")
  parser.add_argument("--dass_steps", type=int, default=0,
                      help="also try the per-layer counts of a DASS mask searched this many steps")
  parser.add_argument("--safs_steps", type=int, default=0,
                      help="then search the hidden layers' activations (SAFS, LAHC) this many "
                           "steps at the best density vector")
  parser.add_argument("--json", default=None, help="write the ranked rows to this JSON file")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  try:
    config = run_config.load_config(args.config, [a for a in rest if a.startswith("--config.")])
  except run_config.ConfigError as e:
    parser.error(str(e))
  clock = time.perf_counter()
  rows = search(config, args.trials, args.steps, args.budget, list(range(args.seeds)), args.seed,
                args.spread, args.val_fraction, args.dass_steps)
  print(table(rows))
  print(summary(rows))
  print(f"{len(rows)} candidates x {args.seeds} seeds, {args.steps} steps each, "
        f"{sum(rows[0]['counts'].values())} kept weights each: {time.perf_counter() - clock:.1f} s")
  record = {"command": " ".join(["python -m experiments.sparse_nas", *(argv or sys.argv[1:])]),
            "budget": args.budget, "steps": args.steps, "seeds": args.seeds,
            "dass_steps": args.dass_steps, "rows": rows}
  if args.safs_steps > 0:
    config.sparsity.density = args.budget
    result, scored = safs_search(config, rows[0]["counts"], args.safs_steps, args.steps,
                                 list(range(args.seeds)), args.seed, args.val_fraction)
    print(safs_table(rows[0]["name"], result, scored))
    record["safs"] = {"candidate": rows[0]["name"], "best": list(result.best),
                      "rows": [dict(row, activations=list(ops)) for ops, row in scored.items()]}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
