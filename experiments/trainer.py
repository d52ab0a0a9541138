"""The training loop: mesh, state, jit, checkpoints, logging and signals; the rest is a task.

`train(config, workdir)` is what `python -m experiments.train` runs. The task (`config.task`,
see `experiments.tasks`) brings the data, model, loss and eval. The train state is a plain dict
pytree `{"step", "params", "model_state", "opt_state", "rng"}` (`model_state`: non-parameter
variable collections, e.g. aux-loss-free router biases); the Grain iterator's state is saved
beside it, so a resumed run sees exactly the batches an uninterrupted one would.
"""
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import checkpoints as ckpt_lib
from experiments import metrics as metrics_lib
from experiments import optim
from experiments import plots
from experiments import preemption
from experiments import run_config
from experiments import tasks
from experiments import warm_start
from experiments.data import loader
from experiments.run_config import ConfigError
from sparsejax import masks
from sparsejax import sharding
from sparsejax.auxiliary import total_aux_loss
from sparsejax.masks import sam_on
from sparsejax.memory import row_grad
from sparsejax.memory import sparse_optim

# RNG streams every model may draw from during training (dropout, router noise, ...).
RNG_STREAMS = ("dropout", "router", "noise")
# Per-expert load fractions in a layer's aux metrics; plotted per eval as [layers, experts].
EXPERT_LOAD_KEY = "/expert_load_E"


class NonFiniteLossError(RuntimeError):
  """The loss or the update became NaN/inf; nothing after the last good checkpoint was saved."""


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  m = config.mesh
  try:
    mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.model, devices=devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  batch_parallel = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if config.train.batch_size % batch_parallel:
    raise ConfigError(
        f"config.train.batch_size={config.train.batch_size} is not divisible by the data-parallel "
        f"size mesh.data*mesh.fsdp*mesh.expert={batch_parallel}")
  return mesh


def objective(task: tasks.Task, params, model_state, batch, *, deterministic: bool, rngs=None):
  """(task loss + aux losses, (task loss, task metrics, aux, new model_state)) on `batch`."""
  (outputs, aux), model_state = task.apply(
      {"params": params, **model_state}, batch, deterministic=deterministic, rngs=rngs,
      mutable=list(model_state))
  loss, metrics = task.loss(outputs, batch)
  return loss + total_aux_loss(aux), (loss, metrics, aux, model_state)


def sam_grads(grad_fn: Callable, weights, grads, rho: float, rule: str):
  """∇L(w + ε), the sharpness-aware gradient, from `grad_fn(w) -> ∇L(w)` and g = `grads`.

  ε = ρ g_S / ‖g_S‖₂ on the leaves S whose path matches `rule`, 0 elsewhere
  (`sam_on.sam_perturbation`); memory value tables whose gradient is in row form
  (`sparse_optim.Rows`) are never perturbed. Foret et al. (2021), "Sharpness-Aware Minimization";
  on normalisation layers only (the default rule): Mueller et al. (2023), "Normalization Layers
  Are All That Sharpness-Aware Minimization Needs".
  """
  eps = sam_on.sam_perturbation(grads, rho, rule)
  return grad_fn(jax.tree.map(lambda e, w: w if sparse_optim.is_rows(e) else w + e, eps, weights,
                              is_leaf=sparse_optim.is_rows))


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, schedule,
                    forward_params: Callable | None = None, value_rows: bool = False,
                    sam_rho: float = 0.0, sam_rule: str = sam_on.NORM_RULE) -> Callable:
  """(state, batch) -> (state, metrics); `finite/loss` and `finite/update` are False when that
  quantity went NaN/inf. With `forward_params(params, opt_state) -> w` (sparse training: the
  masked weights), the loss and its gradient are taken at w. With `value_rows`
  (config.train.memory_values="sparse"), memory value tables' gradients and updates are
  `sparse_optim.Rows` (`row_grad.value_and_row_grad`): no N x D buffer in the step. With
  `sam_rho` > 0 (config.train.sam_rho / sam_rule) the optimizer gets `sam_grads` (the gradient
  at w + ε, ε from the gradient at w, masked like w under sparse training, so pruned weights
  stay 0); the loss, metrics and model state reported are those at w, and
  `train/grad_norm` is the norm of the gradient the optimizer gets."""
  if value_rows and forward_params is not None:
    raise ValueError("config.train.memory_values='sparse' does not combine with sparse training "
                     "(config.sparsity.enabled)")
  value_and_grad = (row_grad.value_and_row_grad(objective, params_argnum=1, collections_argnum=2)
                    if value_rows else jax.value_and_grad(objective, argnums=1, has_aux=True))

  def train_step(state, batch):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    rngs = {name: jax.random.fold_in(step_rng, i) for i, name in enumerate(RNG_STREAMS)}
    weights = (state["params"] if forward_params is None
               else forward_params(state["params"], state["opt_state"]))
    value_and_grad_at = lambda w: value_and_grad(task, w, state["model_state"], batch,
                                                 deterministic=False, rngs=rngs)
    (total, (loss, task_metrics, aux, model_state)), grads = value_and_grad_at(weights)
    if sam_rho:
      kept = grads if forward_params is None else forward_params(grads, state["opt_state"])
      grads = sam_grads(lambda w: value_and_grad_at(w)[1], weights, kept, sam_rho, sam_rule)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    update_norm = sparse_optim.tree_norm(updates)
    new_state = {"step": state["step"] + 1,
                 "params": sparse_optim.apply_updates(state["params"], updates),
                 "model_state": model_state, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {
        "train/loss": loss, "train/total_loss": total,
        "train/grad_norm": sparse_optim.tree_norm(grads),
        "train/update_norm": update_norm, "train/learning_rate": schedule(state["step"]),
        **{f"train/{k}": v for k, v in {**task_metrics, **aux["losses"], **aux["metrics"]}.items()},
        "finite/loss": jnp.isfinite(total), "finite/update": jnp.isfinite(update_norm),
    }
    if forward_params is not None:
      metrics.update(optim.density_metrics(masks.get_mask(opt_state)))
    return new_state, metrics

  return train_step


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  stacked = jax.device_get(window)
  return {k: np.mean([m[k] for m in stacked], axis=0) for k in stacked[0]}


class Trainer:
  """Everything `train` sets up: mesh, task, state shardings, jitted steps, checkpoints, metrics."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    run_config.check_config(config, tasks.TASKS)
    run_config.check_workdir(workdir)
    self.config, self.workdir = config, workdir
    self.mesh = make_mesh(config, devices)
    self.checkpoints = ckpt_lib.Checkpoints(workdir, config.checkpoint.keep)
    fresh = self.checkpoints.latest_step() is None
    try:
      if not fresh:  # a run without checkpoints may restart with any config
        run_config.check_resume(config, workdir)
      self.task = tasks.build_task(config)
      self.batch_sharding = tasks.batch_sharding(self.task, self.mesh)
      self.rows = loader.process_rows(self.batch_sharding, config.train.batch_size)
      self.data = self._train_iterator(self.rows)
      tx, self.schedule = optim.make_optimizer(config.train, config.sparsity)
      self.tx = self.task.wrap_optimizer(tx)
      self._init_params, model_state = self._initial_variables(
          load=fresh and config.init.from_workdir is not None)
      self.initial_mask = (self._make_sparse_optimizer(model_state, fresh)
                           if config.sparsity.enabled else None)
      self._init_abstract_state()  # traces the model: layers check their settings here
      optim.check_sam(config.train, self.abstract_state["params"])
    except ValueError as e:
      self.checkpoints.close()
      raise ConfigError(str(e)) from None
    if jax.process_index() == 0:
      run_config.write_config(config, workdir)
    with jax.set_mesh(self.mesh), sharding.with_rules():
      forward = optim.masked_params if self.initial_mask is not None else None
      self.train_step = jax.jit(
          make_train_step(self.task, self.tx, self.schedule, forward,
                          value_rows=config.train.get("memory_values") == "sparse",
                          sam_rho=config.train.sam_rho, sam_rule=config.train.sam_rule),
          in_shardings=(self.state_shardings, self.batch_sharding),
          out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
      self.eval_step = jax.jit(self.task.eval_step, in_shardings=(
          {"params": self.state_shardings["params"], **self.state_shardings["model_state"]},
          self.batch_sharding))

  def _train_iterator(self, rows: np.ndarray):
    return loader.make_train_iterator(self.task.train_source, rows=rows, seed=self.config.seed,
                                      global_batch_size=self.config.train.batch_size)

  def _init_variables_boxed(self, rng):
    """All variable collections: "params" plus any state a layer keeps (e.g. router biases)."""
    return self.task.model.init({"params": rng}, self.task.init_inputs())

  def _initial_variables(self, load: bool) -> tuple[Any, Any]:
    """(params, model_state) training starts from, as host arrays, when needed before the state
    is built: the params of `config.init.from_workdir` (`load`), or the fresh draw when a mask
    is scored on them; (None, None) otherwise."""
    if not (load or self.config.sparsity.enabled):
      return None, None
    init_rng, _ = jax.random.split(jax.random.PRNGKey(self.config.seed))
    model_state = jax.device_get(nn.meta.unbox(self._init_variables_boxed(init_rng)))
    params = model_state.pop("params")
    return (warm_start.load_params(self.config.init, params) if load else params), model_state

  def _make_sparse_optimizer(self, model_state: Any, fresh: bool) -> masks.Mask:
    """Wraps `self.tx` for sparse training; the initial mask, scored on the initial params (on
    a resume the checkpoint holds the mask, so magnitude scores give its template)."""
    sparsity = self.config.sparsity
    optim.check_sparsity(sparsity)
    if not fresh:
      self.tx, mask = optim.make_sparse_optimizer(self.tx, sparsity, self._init_params,
                                                  self.config.seed, init="magnitude")
      return mask
    grad_fn = jax.grad(lambda p, b: objective(self.task, p, model_state, b, deterministic=True)[0])

    def first_batches(n):  # whole global batches: the scores are computed on the host
      batches = self._train_iterator(np.arange(self.config.train.batch_size))
      first = [next(batches) for _ in range(n)]
      batches.close()
      return first

    inputs = optim.initial_mask_inputs(sparsity, grad_fn, self._init_params, first_batches)
    self.tx, mask = optim.make_sparse_optimizer(self.tx, sparsity, self._init_params,
                                                self.config.seed, inputs)
    return mask

  def _init_abstract_state(self) -> None:
    with jax.set_mesh(self.mesh), sharding.with_rules():
      boxed = jax.eval_shape(self._init_variables_boxed, jax.random.PRNGKey(0))
    self.param_counts = tasks.param_counts(self.task, boxed["params"])
    shardings = sharding.logical_to_mesh_sharding(nn.get_partition_spec(boxed), self.mesh)
    variables = nn.meta.unbox(boxed)
    abstract_params = variables.pop("params")
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt_shardings = masks.map_param_like(lambda leaf, s: s, abstract_opt, abstract_params,
                                         shardings["params"], other=lambda leaf: self.replicated)
    self.state_shardings = {"step": self.replicated, "params": shardings.pop("params"),
                            "model_state": shardings, "opt_state": opt_shardings,
                            "rng": self.replicated}
    self.abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
        "model_state": variables, "opt_state": abstract_opt,
        "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}

  def init_state(self) -> dict[str, Any]:
    """Fresh state, each leaf created directly with its sharding; warm-started params (and the
    initial mask applied to the params) where the config asks."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    loaded = self._init_params if self.config.init.from_workdir is not None else None

    def init(init_rng, train_rng, loaded):
      variables = nn.meta.unbox(self._init_variables_boxed(init_rng))
      params = variables.pop("params")
      params = params if loaded is None else loaded
      if self.initial_mask is not None:
        params = self.initial_mask.apply(params)
      return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": variables,
              "opt_state": self.tx.init(params), "rng": train_rng}

    with jax.set_mesh(self.mesh), sharding.with_rules():
      return jax.jit(init, out_shardings=self.state_shardings)(init_rng, train_rng, loaded)

  def restore_or_init(self) -> dict[str, Any]:
    """The newest checkpoint that restores (data iterator state included), or a fresh state."""
    abstract = ckpt_lib.abstract_like(self.abstract_state, self.state_shardings)
    restored = self.checkpoints.restore_latest(abstract)
    if restored is None:
      return self.init_state()
    state, meta, step = restored
    try:
      self.data.set_state(meta["data_state"])
    except (KeyError, ValueError) as e:
      raise ckpt_lib.CheckpointError(f"checkpoint step {step} in {self.checkpoints.directory} "
                                     f"holds no usable data state ({e})") from None
    print(f"resumed from {self.checkpoints.directory} at step {step}", flush=True)
    return state

  def evaluate(self, state) -> dict[str, Any]:
    """The task's eval summary over its fixed eval batches (masked weights under sparsity)."""
    params = state["params"]
    if self.initial_mask is not None:
      params = optim.masked_params(params, state["opt_state"])
    variables = {"params": params, **state["model_state"]}
    totals = None
    for batch in self.task.eval_batches:
      size = len(next(iter(batch.values())))  # eval batches may differ from train batches
      local = loader.take_rows(batch, loader.process_rows(self.batch_sharding, size))
      sums = self.eval_step(variables, self._put(local, size))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return self.task.eval_summary(jax.device_get(totals))

  def _put(self, local_batch: dict[str, np.ndarray], size: int):
    """This process's rows of a global batch of `size` rows as arrays sharded over batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (size, *v.shape[1:]))
            for k, v in local_batch.items()}

  def run(self, stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains to `config.train.num_steps`, or until a signal (or `stop_at_step`) pre-empts it;
    returns the last logged scalars, with "preempted" saying which."""
    cfg = self.config.train
    state = self.restore_or_init()
    step = int(state["step"])
    self.metrics = metrics_lib.MetricsWriter(self.workdir, resume_step=step,
                                             primary=jax.process_index() == 0)
    print(metrics_lib.banner(self.mesh, self.task, self.param_counts, step, cfg.num_steps),
          flush=True)
    last_saved = step if step else None
    window, summary = [], {"step": step}
    clock, clock_step, compiled = time.perf_counter(), step, False
    with preemption.StopSignal() as stop:
      while step < cfg.num_steps:
        state, metrics = self.train_step(state, self._put(next(self.data), cfg.batch_size))
        step += 1
        window.append(metrics)
        if not compiled:  # do not count compilation in the first window's speed
          jax.block_until_ready(state)
          print(f"step {step} done: compiled and ran in {time.perf_counter() - clock:.1f} s",
                flush=True)
          clock, clock_step, compiled = time.perf_counter(), step, True
        preempted = stop.received_anywhere() or step == stop_at_step
        log = step % cfg.log_every == 0 or step == cfg.num_steps
        evaluate = step % cfg.eval_every == 0 or step == cfg.num_steps
        save = step % self.config.checkpoint.every == 0 or step == cfg.num_steps or preempted
        if not (log or evaluate or save):
          continue
        record, window = _mean_metrics(window), []
        self._check_finite(record, step, last_saved)
        eta = None
        if step > clock_step:  # training speed only: eval and saving are timed out below
          steps_per_sec = (step - clock_step) / (time.perf_counter() - clock)
          record["steps_per_sec"] = steps_per_sec
          record[f"{self.task.unit}_per_sec"] = (
              steps_per_sec * cfg.batch_size * self.task.units_per_example)
          eta = (cfg.num_steps - step) / steps_per_sec
        if evaluate:
          record.update(self.evaluate(state))
        if log or evaluate:
          self.metrics.write(step, record, eta)
        if evaluate and cfg.plot_expert_load and jax.process_index() == 0:
          self._plot_expert_load(record, step)
        summary = {"step": step, **{k: float(v) for k, v in record.items() if np.ndim(v) == 0}}
        if save:
          self.save(state, step)
          last_saved = step
        clock, clock_step = time.perf_counter(), step
        if preempted:
          print(f"preempted ({stop.reason or 'stop_at_step'}) at step {step}; saved", flush=True)
          break
    self.checkpoints.wait()
    self.state = state
    return {**summary, "preempted": step < cfg.num_steps, "headline": self.task.headline}

  def save(self, state, step: int) -> None:
    """Checkpoints `state` as step `step`, with the data iterator's state and the config."""
    self.checkpoints.save(step, state, {"step": step, "data_state": self.data.get_state(),
                                        "config": self.config.to_json()})

  def _plot_expert_load(self, record: dict[str, np.ndarray], step: int) -> None:
    """Writes the [layers, experts] load fractions of the last window as a PNG heatmap."""
    keys = sorted((k for k in record if k.endswith(EXPERT_LOAD_KEY)), key=metrics_lib.layer_order)
    if keys:
      os.makedirs(os.path.join(self.workdir, "plots"), exist_ok=True)
      plots.write_expert_load(os.path.join(self.workdir, "plots", f"expert_load_{step:07d}.png"),
                              np.stack([record[k] for k in keys]), step,
                              [k.split("/")[1] for k in keys])

  @staticmethod
  def _check_finite(record: dict[str, np.ndarray], step: int, last_saved: int | None) -> None:
    bad = [name for name in ("loss", "update") if not np.all(record.pop(f"finite/{name}") == 1.0)]
    if bad:
      kept = f"step {last_saved}" if last_saved is not None else "none yet"
      quantity = ("the loss" if "loss" in bad else
                  f"the parameter update (train/update_norm={record['train/update_norm']:.4g}, "
                  f"while train/loss={record['train/loss']:.4g} was finite)")
      raise NonFiniteLossError(f"{quantity} became NaN/inf before step {step}; stopped without "
                               f"saving. Last good checkpoint: {kept}")

  def close(self) -> None:
    self.data.close()
    self.checkpoints.close()
    if hasattr(self, "metrics"):
      self.metrics.close()


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir/checkpoints` if present); returns the last logged metrics
  and "preempted" (True when a signal or `stop_at_step` stopped it early, checkpoint saved)."""
  trainer = Trainer(config, workdir, devices)
  try:
    return trainer.run(stop_at_step)
  finally:
    trainer.close()
