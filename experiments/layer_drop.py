"""Removing whole residual blocks of an "lm" config's LM at initialisation, saved as a checkpoint
that a shallower run starts from ("layers play the lottery").

  info = layer_drop.write_shallow_init(config, "/tmp/ticket", num_drop=2, score="snip")
  config.model.num_layers -= 2; config.init.from_workdir = "/tmp/ticket"
  trainer.train(config, "/tmp/ticket_run")   # the L - 2 block LM from the deep LM's init

The deep LM's params are drawn exactly as `trainer.train(config, ...)` draws them (same seed,
same RNG split), scored on its first `num_batches` training batches (the gradient of the
training objective at init, averaged over the batches, `sparsejax.masks.layer_lottery`), or
chosen uniformly at random ("random", from the seed), and the kept blocks are renumbered
(`drop_blocks`); `warm_start` reads the result through `config.init.from_workdir`.
Jordao et al. 2023, "When Layers Play the Lottery, all Tickets Win at Initialization".
"""
from typing import Any

import itertools

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from experiments import checkpoints as ckpt_lib
from experiments import tasks
from experiments import trainer
from experiments.data import loader
from sparsejax.masks import init as mask_init
from sparsejax.masks import layer_lottery

SCORES = layer_lottery.SCORES + ("random",)
RANDOM_STREAM = 0x1a7e  # folded into the seed for the "random" choice of blocks


def initial_variables(config: ml_collections.ConfigDict, task: tasks.Task) -> tuple[Any, Any]:
  """(params, model_state) a fresh `trainer.train(config)` run starts from, as host arrays."""
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = nn.meta.unbox(task.model.init({"params": init_rng}, task.init_inputs()))
  variables = jax.device_get(variables)
  return variables.pop("params"), variables


def first_batches(config: ml_collections.ConfigDict, task: tasks.Task, n: int) -> list[dict]:
  """The first `n` global training batches the run with `config` sees."""
  batches = loader.make_train_iterator(task.train_source, global_batch_size=config.train.batch_size,
                                       seed=config.seed, rows=np.arange(config.train.batch_size))
  first = [next(batches) for _ in range(n)]
  batches.close()
  return first


def random_blocks(num_layers: int, num_drop: int, seed: int,
                  avoid: tuple[int, ...] | None = None) -> tuple[int, ...]:
  """A uniform draw (from the seed) among the sorted `num_drop`-subsets of blocks
  0..num_layers-1 other than `avoid` (e.g. the scored choice, so that the control differs)."""
  if not 0 <= num_drop < num_layers:
    raise ValueError(f"num_drop must be in [0, {num_layers}), got {num_drop}")
  subsets = [c for c in itertools.combinations(range(num_layers), num_drop)
             if avoid is None or c != tuple(sorted(avoid))]
  if not subsets:
    raise ValueError(f"no {num_drop}-subset of {num_layers} blocks other than avoid={avoid}")
  key = jax.random.fold_in(jax.random.PRNGKey(seed), RANDOM_STREAM)
  return subsets[int(jax.random.randint(key, (), 0, len(subsets)))]


def choose_blocks(config: ml_collections.ConfigDict, num_drop: int, score: str = "snip",
                  num_batches: int = 4, avoid: tuple[int, ...] | None = None) -> dict[str, Any]:
  """The deep LM of `config` at init and the blocks to drop from it.

  Returns {"params": the deep LM's initial params, "dropped": sorted block indices, "scores":
  {block: score} (empty for "random")}. "snip" / "grad_norm" score with ḡ = (1/n) Σ_b ∇L(θ₀; b)
  over the first n training batches (`layer_lottery.block_scores`) and drop the lowest;
  "random" draws `random_blocks(..., avoid)` from config.seed.
  """
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")
  if config.task != "lm":
    raise ValueError(f"config.task={config.task!r}; blocks are dropped from 'lm' runs only")
  task = tasks.build_task(config)
  params, model_state = initial_variables(config, task)
  if score == "random":
    return {"params": params, "scores": {},
            "dropped": random_blocks(config.model.num_layers, num_drop, config.seed, avoid)}
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  grad_fn = jax.grad(lambda p, b: trainer.objective(task, p, model_state, b,
                                                    deterministic=True)[0])
  batches = first_batches(config, task, num_batches)
  grads = jax.tree.map(lambda g: g / num_batches,
                       mask_init.accumulate_grads(grad_fn, params, batches))
  scores = {b: float(s) for b, s in layer_lottery.block_scores(params, grads, score).items()}
  return {"params": params, "scores": scores,
          "dropped": layer_lottery.blocks_to_drop(params, grads, num_drop, score)}


def save_params(workdir: str, params: Any, meta: dict[str, Any]) -> None:
  """Writes `params` as step 0 of `workdir`'s checkpoints, the form `warm_start` reads."""
  checkpoints = ckpt_lib.Checkpoints(workdir)
  try:
    checkpoints.save(0, {"params": params}, meta)
  finally:
    checkpoints.close()


def write_shallow_init(config: ml_collections.ConfigDict, workdir: str, num_drop: int,
                       score: str = "snip", num_batches: int = 4,
                       avoid: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Saves in `workdir` the init of the LM with `num_drop` fewer blocks: `config`'s deep LM at
  init without the blocks `choose_blocks` picks. Returns {"dropped", "scores"}."""
  chosen = choose_blocks(config, num_drop, score, num_batches, avoid)
  info = {"dropped": list(chosen["dropped"]),
          "scores": {str(b): s for b, s in chosen["scores"].items()}}
  save_params(workdir, layer_lottery.drop_blocks(chosen["params"], chosen["dropped"]),
              {**info, "score": score, "from_num_layers": config.model.num_layers})
  return info
