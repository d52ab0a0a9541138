"""What a task is: everything that differs between kinds of runs, behind one small interface.

The trainer owns the loop (mesh, state, jit, checkpoints, logging, signals) and calls a task for
the rest. A task is built from the run's config and holds:

  model            a Flax Linen module whose call returns `(outputs, aux)` (see
                   `sparsejax.models`); `apply` feeds it a batch
  train_source     random-access training examples (`len`, `[i]` -> dict of numpy arrays),
                   read through `experiments.data.loader` in a seeded shuffled order
  eval_batches     the fixed list of global eval batches (dicts of [B, ...] numpy arrays)
  batch_axes       logical axis names of a batch array's leading dims, e.g. ("batch", "length")
  unit, units_per_example   what throughput counts: "tokens" (T per example) or "examples" (1)
  headline         the eval metrics printed when the run ends, e.g. ("eval/bpb",)
  description      one line naming the data, for the start-up banner

and implements `loss(outputs, batch) -> (loss, metrics)` (the trainer adds the model's aux
losses), `eval_step(variables, batch) -> sums` (a pytree that adds up over eval batches) and
`eval_summary(totals) -> {name: float}`; it may constrain the optimizer (`wrap_optimizer`). Eval
batches may have another leading size than training batches. A new kind of run is one file in
`experiments/tasks/` registering its class with `@TASKS.register("name")`; `config.task` picks it.
"""
import abc
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from sparsejax import sharding
from sparsejax.registry import Registry

TASKS: Registry = Registry("task")


def weighted_cross_entropy(logits, targets, weights):
  """(sum of weighted NLL in nats, sum of weights) of integer `targets` under `logits`."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


class Task(abc.ABC):
  """The interface the trainer calls; subclasses set the attributes the module docstring lists."""

  headline: ClassVar[tuple[str, ...]] = ("eval/loss",)
  unit: ClassVar[str] = "examples"
  batch_axes: ClassVar[tuple[str, ...]] = ("batch",)
  units_per_example: int = 1
  model: nn.Module
  train_source: Any
  eval_batches: list[dict[str, Any]]
  description: str = ""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for settings this task cannot run, before any data is read."""
    del config

  @abc.abstractmethod
  def init_inputs(self) -> jax.Array:
    """A model input of batch size 1, for `model.init`."""

  def apply(self, variables, batch, **kwargs):
    """The model on `batch` (kwargs: deterministic, rngs, mutable, as for `nn.Module.apply`)."""
    return self.model.apply(variables, batch["inputs"], **kwargs)

  @abc.abstractmethod
  def loss(self, outputs, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(task loss, metrics) of the model outputs on `batch`; the trainer adds the aux losses."""

  @abc.abstractmethod
  def eval_step(self, variables, batch) -> Any:
    """Sums over one eval batch (a pytree that adds up over batches)."""

  @abc.abstractmethod
  def eval_summary(self, totals) -> dict[str, float]:
    """Eval metrics from the sums over all eval batches."""

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The optimizer this task trains with, from the configured one (e.g. a constraint chained
    after it); unchanged by default."""
    return tx

  def active_fraction(self, path: str, axes: tuple[str | None, ...]) -> float:
    """The fraction of a param a single example uses (1 unless the model routes, see lm)."""
    del path, axes
    return 1.0


def build_task(config: ml_collections.ConfigDict) -> Task:
  """The task `config.task`, after its config check; with several processes, process 0 builds
  it (and so prepares its data) before the others."""
  task_class = TASKS.get(config.task)
  task_class.check_config(config)
  if jax.process_count() == 1:
    return task_class(config)
  task = task_class(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("task data prepared")
  return task or task_class(config)


def param_counts(task: Task, boxed_params: Any) -> tuple[int, int]:
  """(total, active per example) parameter counts; boxed leaves carry their logical axes."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  total = active = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_box)[0]:
    axes = tuple(leaf.names) if is_box(leaf) else ()
    size = nn.meta.unbox(leaf).size
    total += size
    active += size * task.active_fraction(jax.tree_util.keystr(path), axes)
  return int(total), int(round(active))


def batch_sharding(task: Task, mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return sharding.logical_to_mesh_sharding(jax.sharding.PartitionSpec(*task.batch_axes), mesh)
