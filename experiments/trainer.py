"""The training loop: sharded jit train step, eval, metrics, checkpoints, resume, clean stops.

`train(config, workdir)` is what `python -m experiments.train` runs. The train state is a
plain dict pytree `{"step", "params", "model_state", "opt_state", "rng"}` (`model_state` holds
the non-parameter variable collections, e.g. aux-loss-free router biases, updated by the train
step outside the gradient); the data position (an integer,
see `experiments.data.IndexSampler`) is saved beside it, so a resumed run sees exactly the
batches an uninterrupted one would.
"""
import math
import os
import re
import signal
import tempfile
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import checkpoints as ckpt_lib
from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import plots
from experiments.configs import base as base_config
from sparsejax import memory
from sparsejax import models
from sparsejax import sharding
from sparsejax import masks
from sparsejax.moe import upcycle

# Subtrees whose extra keys are a layer's own arguments, validated by the model builder.
FREE_FORM_KEYS = ("model.ffn", "model.attention", "model.embedding", "classifier",
                  "sparsity.updater", "sparsity.schedule")
# RNG streams every model may draw from during training (dropout, router noise, ...).
RNG_STREAMS = ("dropout", "router", "noise")
# config.task values: a byte-level LM on text, or a classifier on a classification dataset
# (the bundled "digits", or a prepared TFDS image dataset, checked when loaded).
TASKS = ("lm", "classify")
# Initial-mask scores (sparsejax.masks.init); saliency and fisher take gradients of the training
# loss on the first `config.sparsity.init_batches` training batches (see `mask_init_kwargs`).
SPARSITY_INITS = ("random", "magnitude", "saliency", "fisher")
# The random initial mask draws from fold_in(PRNGKey(config.seed), MASK_RNG_STREAM).
MASK_RNG_STREAM = 1


# Per-expert load fractions in a layer's aux metrics; plotted per eval as [layers, experts].
EXPERT_LOAD_KEY = "/expert_load_E"


def _layer_order(key: str) -> tuple[int, str]:
  match = re.search(r"layer_(\d+)/", key)
  return (int(match[1]) if match else -1, key)


class ConfigError(ValueError):
  """A config, mesh or workdir value that cannot work; the message names it and what is allowed."""


class NonFiniteLossError(RuntimeError):
  """The loss or the update became NaN/inf; nothing after the last good checkpoint was saved."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for keys the trainer does not know, listing the allowed ones."""
  allowed = _flat_keys(base_config.get_config())
  for key in _flat_keys(config):
    if key in allowed or any(key.startswith(p + ".") for p in FREE_FORM_KEYS):
      continue
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(k for k in allowed if k.rsplit(".", 1)[0] == section and "." in k) or sorted(
        k for k in allowed if "." not in k
    )
    raise ConfigError(f"unknown config key {key!r}; allowed here: {', '.join(siblings)}")
  if config.task not in TASKS:
    raise ConfigError(f"config.task={config.task!r}; allowed: {', '.join(TASKS)}")
  train = config.train
  for name in ("num_steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
    if train[name] < 1:
      raise ConfigError(f"config.train.{name}={train[name]} must be >= 1")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
    raise ConfigError(
        f"config.checkpoint.every={config.checkpoint.every} and config.checkpoint.keep="
        f"{config.checkpoint.keep} must both be >= 1"
    )
  if train.seq_len > config.model.max_len:
    raise ConfigError(
        f"config.train.seq_len={train.seq_len} exceeds config.model.max_len={config.model.max_len}"
    )


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for name, value in config.items():
    key = prefix + name
    if isinstance(value, ml_collections.ConfigDict) and key not in FREE_FORM_KEYS:
      keys |= _flat_keys(value, key + ".")
    else:
      keys.add(key)
  return keys


def with_data_statistics(model_config: ml_collections.ConfigDict,
                         train_data: data_lib.WindowDataset) -> ml_collections.ConfigDict:
  """`model_config` with `model.ffn.token_frequencies="train"` replaced by the training split's
  unigram token frequencies (a tuple of VOCAB_SIZE floats), e.g. for balanced hash routing."""
  if model_config.ffn.get("token_frequencies") != "train":
    return model_config
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  counts = train_data.token_counts(data_lib.VOCAB_SIZE)
  del model_config.ffn["token_frequencies"]
  model_config.ffn.token_frequencies = tuple(float(c) for c in counts / counts.sum())
  return model_config


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and checks a file can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r} is not a writable directory ({e.strerror})") from None


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  m = config.mesh
  try:
    mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.model, devices=devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  # The batch is split over data x fsdp x expert (sparsejax.sharding's "batch" rule).
  batch_parallel = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if config.train.batch_size % batch_parallel:
    raise ConfigError(
        f"config.train.batch_size={config.train.batch_size} is not divisible by the data-parallel "
        f"size mesh.data*mesh.fsdp*mesh.expert={batch_parallel}"
    )
  return mesh


def make_optimizer(train: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay, after global-norm gradient clipping.

  With `memory_value_learning_rate`, product-key memory value tables get their own AdamW whose
  schedule is the same one scaled to that peak (`sparsejax.memory.make_memory_optimizer`).

  The warmup is capped at num_steps - 1 so that short runs (e.g. `--config.train.num_steps=20`)
  still decay.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train.learning_rate,
      warmup_steps=min(train.warmup_steps, train.num_steps - 1),
      decay_steps=train.num_steps,
      end_value=train.learning_rate * train.end_lr_fraction,
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  make_adamw = lambda lr: optax.adamw(lr, b1=train.b1, b2=train.b2,
                                      weight_decay=train.weight_decay, mask=decay_mask)
  if train.memory_value_learning_rate is None:
    update = make_adamw(schedule)
  else:
    ratio = train.memory_value_learning_rate / train.learning_rate
    update = memory.make_memory_optimizer(make_adamw, schedule, lambda step: ratio * schedule(step))
  return optax.chain(optax.clip_by_global_norm(train.grad_clip), update), schedule


def weighted_cross_entropy(logits_BTV, targets_BT, weights_BT):
  """(sum of weighted token NLL in nats, sum of weights)."""
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT
  )
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def _stream_rngs(rng, step):
  step_rng = jax.random.fold_in(rng, step)
  return {name: jax.random.fold_in(step_rng, i) for i, name in enumerate(RNG_STREAMS)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule,
                    forward_params: Callable | None = None) -> Callable:
  """(state, batch) -> (state, metrics); metrics include `finite`, False if anything went NaN/inf.

  With `forward_params(params, opt_state) -> w` (sparse training: the masked weights), the loss
  and its gradient are taken at w, and the optimizer gets that gradient and the params.
  """

  def loss_fn(params, model_state, batch, rngs):
    (logits, aux), model_state = model.apply(
        {"params": params, **model_state}, batch["inputs"], deterministic=False, rngs=rngs,
        mutable=list(model_state),
    )
    nll_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    ce = nll_sum / jnp.maximum(weight_sum, 1.0)
    aux_loss = sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
    return ce + aux_loss, (ce, aux, model_state)

  def train_step(state, batch):
    rngs = _stream_rngs(state["rng"], state["step"])
    weights = (state["params"] if forward_params is None
               else forward_params(state["params"], state["opt_state"]))
    (total, (ce, aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        weights, state["model_state"], batch, rngs
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    update_norm = optax.tree.norm(updates)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "model_state": model_state,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    metrics = {
        "train/loss": ce,
        "train/total_loss": total,
        "train/grad_norm": optax.tree.norm(grads),
        "train/update_norm": update_norm,
        "train/learning_rate": schedule(state["step"]),
        **{f"train/{k}": v for k, v in aux["losses"].items()},
        **{f"train/{k}": v for k, v in aux["metrics"].items()},
        "finite": jnp.isfinite(total) & jnp.isfinite(update_norm),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """(params, model_state, batch) -> (sum of NLL in nats, number of scored tokens, memory slot
  histograms {layer: (reads, weight mass)}, empty without memory layers; they add over batches)."""

  def eval_step(params, model_state, batch):
    (logits, _), access = model.apply({"params": params, **model_state}, batch["inputs"],
                                      deterministic=True, mutable=[memory.ACCESS])
    histograms = memory.read_histograms(params, access.get(memory.ACCESS, {}))
    return (*weighted_cross_entropy(logits, batch["targets"], batch["weights"]), histograms)

  return eval_step


def make_classify_eval_step(model: nn.Module) -> Callable:
  """(params, model_state, batch) -> (sum of NLL in nats, number of examples, number correct)."""

  def eval_step(params, model_state, batch):
    logits_BC, _ = model.apply({"params": params, **model_state}, batch["inputs"],
                               deterministic=True)
    nll, count = weighted_cross_entropy(logits_BC, batch["targets"], batch["weights"])
    correct_B = jnp.argmax(logits_BC, axis=-1) == batch["targets"]
    return nll, count, jnp.sum(correct_B * batch["weights"])

  return eval_step


def _load_classification(config: ml_collections.ConfigDict):
  """(train split, eval split, model) of a `task="classify"` config: the bundled digits, or
  the prepared TFDS image dataset `config.data.name` (see `experiments.data.images`)."""
  names = (config.data.train_split, config.data.eval_split)
  if config.data.name == data_lib.digits.NAME:
    splits = [data_lib.digits.load_digits(s) for s in names]
    num_classes = data_lib.digits.NUM_CLASSES
  else:
    data_dir = config.data.data_dir
    splits = [data_lib.images.load_images(config.data.name, s, data_dir=data_dir) for s in names]
    num_classes = data_lib.images.num_classes(config.data.name, data_dir=data_dir)
  model = models.build_classifier(config.classifier, num_classes)
  return splits[0], splits[1], model


def _named_entry(section: str, entry: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """("name", other fields) of a free-form `{"name": ..., **kwargs}` config entry."""
  kwargs = entry.to_dict()
  if "name" not in kwargs:
    raise ValueError(f"config.{section} needs a 'name' field, got keys {sorted(kwargs)}")
  name = kwargs.pop("name")
  return name, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def check_sparsity_init(sparsity: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `sparsity.init` / `sparsity.init_batches` if the trainer cannot
  compute those initial-mask scores."""
  if sparsity.init not in SPARSITY_INITS:
    raise ValueError(f"config.sparsity.init={sparsity.init!r}; allowed in the trainer: "
                     f"{', '.join(SPARSITY_INITS)}")
  if sparsity.init in ("saliency", "fisher") and sparsity.init_batches < 1:
    raise ValueError(f"config.sparsity.init_batches={sparsity.init_batches} must be >= 1 for "
                     f"init={sparsity.init!r}")


def mask_init_kwargs(init: str, grad_fn: Callable[[Any, Any], Any], params: Any,
                     batches: list[Any]) -> dict[str, Any]:
  """The extra arguments of the mask init `init` (`sparsejax.masks.init`) from batch gradients
  g_b = grad_fn(params, batch_b), b = 1..n:

    random, magnitude   {} (scores from params alone)
    saliency            grads = (1/n) sum_b g_b, so the score is |w mean_b g_b| (SNIP)
    fisher              sq_grads = sum_b g_b^2 (`accumulate_sq_grads`; batch, not per-example,
                        gradients: the diagonal empirical Fisher of the batch means)
  """
  if init == "saliency":
    total = masks.accumulate_grads(grad_fn, params, batches)
    return {"grads": jax.device_get(jax.tree.map(lambda g: g / len(batches), total))}
  if init == "fisher":
    return {"sq_grads": jax.device_get(masks.accumulate_sq_grads(grad_fn, params, batches))}
  return {}


def make_sparse_optimizer(tx: optax.GradientTransformation, sparsity: ml_collections.ConfigDict,
                          params: Any, seed: int, init_kwargs: dict[str, Any] | None = None):
  """(`tx` under `sparsejax.masks.wrap`, the initial `Mask`) as `config.sparsity` describes.

  The initial mask keeps a `sparsity.density` fraction of the sparsified leaves of `params`,
  spread over the leaves by `sparsity.distribution`, scored by `sparsity.init` (random draws
  from fold_in(PRNGKey(seed), MASK_RNG_STREAM); saliency / fisher need `init_kwargs` from
  `mask_init_kwargs`); the updater and schedule come from the registries by name.
  """
  check_sparsity_init(sparsity)
  rules = tuple((pattern, spec.to_dict() if hasattr(spec, "to_dict") else spec)
                for pattern, spec in sparsity.rules)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), MASK_RNG_STREAM)
  try:
    mask = masks.make_mask(params, sparsity.density, sparsity.distribution, rules,
                           init=sparsity.init, key=key, power=sparsity.erk_power,
                           **(init_kwargs or {}))
  except ValueError as e:
    raise ValueError(f"config.sparsity (density={sparsity.density}): {e}") from None
  updater_name, updater_kwargs = _named_entry("sparsity.updater", sparsity.updater)
  schedule_name, schedule_kwargs = _named_entry("sparsity.schedule", sparsity.schedule)
  try:
    updater = masks.make_updater(updater_name, **updater_kwargs)
    schedule = (None if schedule_name == "none"
                else masks.make_schedule(schedule_name, **schedule_kwargs))
    return masks.wrap(tx, updater, schedule, mask, seed=seed), mask
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.sparsity.updater={updater_name!r} / schedule={schedule_name!r}: "
                     f"{e}") from None


def density_metrics(mask) -> dict[str, jax.Array]:
  """Kept fraction of every sparsified leaf ("density/<path>") and over all of them together
  ("density/global"), as jnp scalars (jit-safe)."""
  flat = mask.flat()
  sparse = mask.sparse_paths()
  metrics = {f"density/{path}": jnp.mean(flat[path], dtype=jnp.float32) for path in sparse}
  kept = sum((jnp.sum(flat[p], dtype=jnp.int32) for p in sparse), jnp.zeros((), jnp.int32))
  size = sum(flat[p].size for p in sparse)
  metrics["density/global"] = kept.astype(jnp.float32) / max(size, 1)
  return metrics


def with_density_metrics(train_step: Callable) -> Callable:
  """`train_step` whose metrics also hold the new mask's `density_metrics`."""

  def step(state, batch):
    state, metrics = train_step(state, batch)
    return state, {**metrics, **density_metrics(masks.get_mask(state["opt_state"]))}

  return step


def masked_params(params: Any, opt_state: Any) -> Any:
  """The weights the model runs with under sparse training: params * mask (mask from `wrap`)."""
  return masks.get_mask(opt_state).apply(params)


class _StopSignal:
  """Records SIGTERM/SIGINT so the loop can checkpoint and exit at the next step boundary."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _like_params(opt_state: Any, params: Any, param_shardings: Any, other: Any) -> Any:
  """Shardings for an optimizer state: a leaf whose key path ends with a param's path and has
  its shape (Adam moments, also inside masks and `optax.multi_transform`) gets that param's
  sharding; every other leaf (counts, scalars) gets `other`."""
  return masks.map_param_like(lambda leaf, sharding: sharding, opt_state, params, param_shardings,
                              other=lambda leaf: other)


def _same_structure(loaded: Any, template: Any) -> Any:
  """`loaded` after checking it has the tree structure and leaf shapes of `template`."""
  if jax.tree.structure(loaded) != jax.tree.structure(template):
    raise ValueError("its params do not have this model's structure; set config.init.upcycle "
                     "to turn a dense model into an MoE one")
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(template)[0],
                               jax.tree.leaves(loaded)):
    if got.shape != want.shape:
      raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {got.shape}, this model "
                       f"needs {want.shape}")
  return jax.tree.map(lambda a, b: np.asarray(a, b.dtype), loaded, template)


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  stacked = jax.device_get(window)
  return {k: np.mean([m[k] for m in stacked], axis=0) for k in stacked[0]}


class Trainer:
  """Everything `train` sets up: mesh, data, model, jitted steps, checkpoints, metrics."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    check_config(config)
    check_workdir(workdir)
    self.config = config
    self.workdir = workdir
    self.mesh = make_mesh(config, devices)
    train = config.train
    self.classify = config.task == "classify"
    self.checkpoints = ckpt_lib.Checkpoints(workdir, config.checkpoint.keep)
    self._warm_params = None  # warm start + sparsity: the loaded params the mask was built on
    try:
      if self.classify:
        self.train_data, self.eval_data, self.model = _load_classification(config)
      else:
        self.train_data = data_lib.load_windows(
            config.data.name, config.data.train_split, train.seq_len,
            data_dir=config.data.data_dir, text_key=config.data.text_key,
        )
        self.eval_data = data_lib.load_windows(
            config.data.name, config.data.eval_split, train.seq_len,
            data_dir=config.data.data_dir, text_key=config.data.text_key,
        )
        self.model = models.build_lm(with_data_statistics(config.model, self.train_data),
                                     vocab_size=data_lib.VOCAB_SIZE)
      self.sampler = data_lib.IndexSampler(
          self.train_data.num_examples if self.classify else self.train_data.num_windows,
          config.seed)
      self.tx, self.schedule = make_optimizer(train)
      self.initial_mask = None  # sparse training: the mask `init_state` starts from
      if config.sparsity.enabled:
        check_sparsity_init(config.sparsity)
        params, model_state = self._initial_params()
        init_kwargs = mask_init_kwargs(
            config.sparsity.init, self._mask_grad_fn(model_state), params,
            [self._train_batch(b * train.batch_size)
             for b in range(config.sparsity.init_batches)])
        self.tx, self.initial_mask = make_sparse_optimizer(
            self.tx, config.sparsity, params, config.seed, init_kwargs)
      self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._init_abstract_state()  # traces the model: layers check their settings here
    except ValueError as e:
      self.checkpoints.close()
      raise ConfigError(str(e)) from None
    if self.classify:  # every eval example once; batches [B, features]
      self.eval_batches = data_lib.digits.eval_batches(self.eval_data, train.batch_size)
    else:
      self.eval_batches = data_lib.eval_batches(self.eval_data, train.batch_size,
                                                train.eval_batches)
    self.batch_sharding = sharding.logical_to_mesh_sharding(
        jax.sharding.PartitionSpec(*(("batch",) if self.classify else ("batch", "length"))),
        self.mesh,
    )
    if self._warm_start_pending():
      self._open_init_source()  # fail now, not after compiling, if there is nothing to load
    self.metrics = metrics_lib.MetricsWriter(workdir)
    with jax.set_mesh(self.mesh), sharding.with_rules():
      sparse = self.initial_mask is not None
      train_step = make_train_step(self.model, self.tx, self.schedule,
                                   masked_params if sparse else None)
      self.train_step = jax.jit(
          with_density_metrics(train_step) if sparse else train_step,
          in_shardings=(self.state_shardings, self.batch_sharding),
          out_shardings=(self.state_shardings, self.replicated),
          donate_argnums=0,
      )
      self.eval_step = jax.jit(
          (make_classify_eval_step if self.classify else make_eval_step)(self.model),
          in_shardings=(self.state_shardings["params"], self.state_shardings["model_state"],
                        self.batch_sharding),
      )

  def _init_variables_boxed(self, rng):
    """All variable collections: "params" plus any state a layer keeps (e.g. router biases)."""
    if self.classify:
      return self.model.init({"params": rng}, jnp.zeros((1, self.train_data.inputs.shape[1])))
    tokens = jnp.zeros((1, self.config.train.seq_len), jnp.int32)
    return self.model.init({"params": rng}, tokens)

  def _init_abstract_state(self) -> None:
    with jax.set_mesh(self.mesh), sharding.with_rules():
      boxed = jax.eval_shape(self._init_variables_boxed, jax.random.PRNGKey(0))
    shardings = sharding.logical_to_mesh_sharding(nn.get_partition_spec(boxed), self.mesh)
    variables = nn.meta.unbox(boxed)
    abstract_params = variables.pop("params")
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = _like_params(abstract_opt, abstract_params, shardings["params"],
                                 self.replicated)
    self.state_shardings = {
        "step": self.replicated,
        "params": shardings.pop("params"),
        "model_state": shardings,
        "opt_state": opt_shardings,
        "rng": self.replicated,
    }
    self.abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "model_state": variables,
        "opt_state": abstract_opt,
        "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    }

  def init_state(self) -> dict[str, Any]:
    """Fresh state, each leaf created directly with its sharding."""
    rng = jax.random.PRNGKey(self.config.seed)
    init_rng, train_rng = jax.random.split(rng)

    def init(init_rng, train_rng):
      variables = nn.meta.unbox(self._init_variables_boxed(init_rng))
      params = variables.pop("params")
      if self.initial_mask is not None:
        params = self.initial_mask.apply(params)
      return {
          "step": jnp.zeros((), jnp.int32),
          "params": params,
          "model_state": variables,
          "opt_state": self.tx.init(params),
          "rng": train_rng,
      }

    with jax.set_mesh(self.mesh), sharding.with_rules():
      state = jax.jit(init, out_shardings=self.state_shardings)(init_rng, train_rng)
    if self.config.init.from_workdir is not None:
      state = self._warm_start(state)
    return state

  def _initial_params(self) -> tuple[Any, Any]:
    """(params, model_state) that training starts from, as host arrays: the ones `init_state`
    draws (same seed; op by op, nothing to compile), with the params of `config.init.from_workdir`
    instead when this run warm-starts from there (so the initial mask is built on them)."""
    init_rng, _ = jax.random.split(jax.random.PRNGKey(self.config.seed))
    variables = jax.device_get(nn.meta.unbox(self._init_variables_boxed(init_rng)))
    params = variables.pop("params")
    if self._warm_start_pending():
      self._warm_params = self._load_init_params(params)
      params = self._warm_params
    return params, variables

  def _mask_grad_fn(self, model_state: Any) -> Callable[[Any, Any], Any]:
    """(params, batch) -> d(training loss)/d(params) at `params`, deterministic (no dropout or
    router noise), on the dense params: the gradients of the saliency / fisher mask inits."""
    model = self.model

    def loss(params, batch):
      (logits, aux), _ = model.apply({"params": params, **model_state}, batch["inputs"],
                                     deterministic=True, mutable=list(model_state))
      nll_sum, weight_sum = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
      aux_loss = sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
      return nll_sum / jnp.maximum(weight_sum, 1.0) + aux_loss

    return jax.grad(loss)

  def _warm_start_pending(self) -> bool:
    """Whether a fresh start of this run loads `config.init.from_workdir` (no own checkpoint)."""
    return self.config.init.from_workdir is not None and self.checkpoints.latest_step() is None

  def _open_init_source(self) -> tuple[ckpt_lib.Checkpoints, int]:
    """The checkpoints of `config.init.from_workdir` and their latest step."""
    source = ckpt_lib.Checkpoints(self.config.init.from_workdir, read_only=True)
    step = source.latest_step()
    if step is None:
      raise ConfigError(
          f"config.init.from_workdir={self.config.init.from_workdir!r} holds no checkpoint"
      )
    return source, step

  def _load_init_params(self, template: Any) -> Any:
    """The params of `config.init.from_workdir` (upcycled if asked) shaped like `template`."""
    source, step = self._open_init_source()
    loaded = source.restore_params(step)
    try:
      if self.config.init.upcycle:
        params = upcycle.upcycle_params(loaded, template)
      else:
        params = _same_structure(loaded, template)
    except ValueError as e:
      raise ConfigError(f"config.init.from_workdir={self.config.init.from_workdir!r}: {e}") from None
    print(f"initialised from {source.directory} step {step}"
          f"{' (upcycled)' if self.config.init.upcycle else ''}", flush=True)
    return params

  def _warm_start(self, state: dict[str, Any]) -> dict[str, Any]:
    """`state` with params from `config.init.from_workdir` (upcycled if asked) and fresh Adam;
    under sparsity, the initial mask (built on these same loaded params) applied to them."""
    params, self._warm_params = self._warm_params, None  # the host copy is needed only once
    if params is None:
      params = self._load_init_params(jax.device_get(state["params"]))
    with jax.set_mesh(self.mesh), sharding.with_rules():
      if self.initial_mask is not None:  # the initial mask, scored on the loaded params
        params = jax.device_get(self.initial_mask.apply(params))
      params = jax.device_put(params, self.state_shardings["params"])
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    return {**state, "params": params, "opt_state": opt_state}

  def restore_or_init(self) -> tuple[dict[str, Any], int]:
    """(state, data position) from the latest checkpoint, or a fresh start at position 0."""
    step = self.checkpoints.latest_step()
    if step is None:
      return self.init_state(), 0
    abstract = ckpt_lib.abstract_like(self.abstract_state, self.state_shardings)
    state, meta = self.checkpoints.restore(step, abstract)
    print(f"resumed from {self.checkpoints.directory} at step {step}", flush=True)
    return state, int(meta["data_position"])

  def evaluate(self, state) -> dict[str, float]:
    """Mean eval loss (nats per token) and bits per byte over the fixed eval batches; for memory
    layers, slot usage, access entropy, top slot share and top slots over the whole window."""
    if self.initial_mask is not None:  # sparse training: evaluate the masked weights
      state = {**state, "params": masked_params(state["params"], state["opt_state"])}
    if self.classify:
      return self._evaluate_classifier(state)
    nll, count, histograms = 0.0, 0.0, {}
    for batch in self.eval_batches:
      batch_nll, batch_count, batch_hists = self.eval_step(state["params"], state["model_state"],
                                                           self._put(batch))
      nll, count = nll + float(batch_nll), count + float(batch_count)
      # Memory layers' slot histograms add up over the eval window (see make_eval_step).
      histograms = jax.tree.map(jnp.add, histograms, batch_hists) if histograms else batch_hists
    loss = nll / max(count, 1.0)
    window = jax.device_get(memory.window_metrics(histograms, prefix="eval/"))
    return {"eval/loss": loss, "eval/bpb": loss / math.log(2), **window}

  def _evaluate_classifier(self, state) -> dict[str, float]:
    """Mean eval loss (nats per example) and accuracy over every example of the eval split."""
    nll, count, correct = 0.0, 0.0, 0.0
    for batch in self.eval_batches:
      sums = self.eval_step(state["params"], state["model_state"], self._put(batch))
      nll, count, correct = (a + float(b) for a, b in zip((nll, count, correct), sums))
    return {"eval/loss": nll / max(count, 1.0), "eval/accuracy": correct / max(count, 1.0)}

  def _train_batch(self, position: int) -> dict[str, np.ndarray]:
    task_data = data_lib.digits if self.classify else data_lib
    return task_data.train_batch(self.train_data, self.sampler, position,
                                 self.config.train.batch_size)

  def _put(self, batch: dict[str, np.ndarray]):
    """The global batch as arrays sharded over the batch axes.

    Every process builds the same global batch (the sampler is seeded) and hands each of its
    devices that device's rows (`jax.make_array_from_process_local_data` with the global shape;
    one process: `device_put`). Correct on any number of hosts; each host reads the whole batch,
    which is cheap for token windows.
    """
    return {name: jax.make_array_from_process_local_data(self.batch_sharding, value, value.shape)
            for name, value in batch.items()}

  def save(self, state, step: int, position: int) -> None:
    meta = {"step": step, "data_position": position, "config": self.config.to_json()}
    self.checkpoints.save(step, state, meta)

  def run(self, stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains to `config.train.num_steps` (or `stop_at_step`, as if pre-empted there)."""
    cfg = self.config.train
    state, position = self.restore_or_init()
    step = int(state["step"])
    last_saved = step if step else None
    window: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"step": step}
    tokens_per_step = cfg.batch_size * (1 if self.classify else cfg.seq_len)  # or examples
    clock, clock_step = time.perf_counter(), step
    first_step_of_run = True
    with _StopSignal() as stop:
      while step < cfg.num_steps:
        batch = self._train_batch(position)
        state, metrics = self.train_step(state, self._put(batch))
        position += cfg.batch_size
        step += 1
        window.append(metrics)
        if first_step_of_run:  # do not count compilation in the first window's speed
          jax.block_until_ready(state)
          clock, clock_step = time.perf_counter(), step
          first_step_of_run = False
        preempted = stop.received is not None or step == stop_at_step
        log = step % cfg.log_every == 0 or step == cfg.num_steps
        evaluate = step % cfg.eval_every == 0 or step == cfg.num_steps
        save = step % self.config.checkpoint.every == 0 or step == cfg.num_steps or preempted
        if not (log or evaluate or save):
          continue
        record = _mean_metrics(window)
        window = []
        self._check_finite(record, step, last_saved)
        eta = None
        if step > clock_step:  # training speed only: eval and saving are timed out below
          steps_per_sec = (step - clock_step) / (time.perf_counter() - clock)
          record["steps_per_sec"] = steps_per_sec
          record["tokens_per_sec"] = steps_per_sec * tokens_per_step
          eta = (cfg.num_steps - step) / steps_per_sec
        if evaluate:
          record.update(self.evaluate(state))
        if log or evaluate:
          self.metrics.write(step, record, eta)
        if evaluate and self.config.train.plot_expert_load:
          self._plot_expert_load(record, step)
        summary = {"step": step,
                   **{k: float(v) for k, v in record.items() if np.ndim(v) == 0}}
        if save:
          self.save(state, step, position)
          last_saved = step
        clock, clock_step = time.perf_counter(), step
        if preempted:
          reason = f"signal {stop.received}" if stop.received is not None else "stop_at_step"
          print(f"stopped at step {step} ({reason}); checkpoint saved", flush=True)
          break
    self.checkpoints.wait()
    self.state = state
    return summary

  def _plot_expert_load(self, record: dict[str, np.ndarray], step: int) -> None:
    """Writes the [layers, experts] load fractions of the last window as a PNG heatmap."""
    loads = [record[k] for k in sorted(record, key=_layer_order) if k.endswith(EXPERT_LOAD_KEY)]
    if not loads:
      return
    os.makedirs(os.path.join(self.workdir, "plots"), exist_ok=True)
    path = os.path.join(self.workdir, "plots", f"expert_load_{step:07d}.png")
    plots.write_heatmap_png(path, np.stack(loads))

  @staticmethod
  def _check_finite(record: dict[str, np.ndarray], step: int, last_saved: int | None) -> None:
    finite = record.pop("finite")
    if not np.all(finite == 1.0):
      kept = f"step {last_saved}" if last_saved is not None else "none yet"
      raise NonFiniteLossError(
          f"non-finite loss or update before step {step} (train/loss={record['train/loss']:.4g}); "
          f"stopped without saving. Last good checkpoint: {kept}"
      )

  def close(self) -> None:
    self.checkpoints.close()
    self.metrics.close()


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir/checkpoints` if present); returns the last logged metrics."""
  trainer = Trainer(config, workdir, devices)
  try:
    return trainer.run(stop_at_step)
  finally:
    trainer.close()
