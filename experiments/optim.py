"""The run's optimizer: AdamW with warmup and cosine decay, and the sparse-training wrapper.

`make_optimizer(config.train)` is what every run uses; with `config.sparsity.enabled`,
`make_sparse_optimizer` wraps it in `sparsejax.masks.wrap` (the mask lives in the optimizer
state, so it is checkpointed and sharded with it).
"""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sparsejax import masks
from sparsejax import memory
from sparsejax.memory import sparse_optim

# The random initial mask draws from fold_in(PRNGKey(config.seed), MASK_RNG_STREAM).
MASK_RNG_STREAM = 1
# How `make_optimizer` updates product-key memory value tables (config.train.memory_values).
MEMORY_VALUES = ("dense", "sparse")


def make_optimizer(train: ml_collections.ConfigDict,
                   sparsity: ml_collections.ConfigDict | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay, after global-norm gradient clipping.

  With `sparsity` enabled (config.sparsity), `sparsity.reset_optimizer` restarts AdamW's
  moments and count after each update step of the sparsity schedule
  (`masks.reset_on_schedule`, the learning rate kept outside the reset) and
  `sparsity.rewind_lr` restarts the learning-rate schedule after each prune step
  (`masks.rewind_lr`): AC/DC's recipe with the "acdc" schedule and updater.

  With `memory_value_learning_rate`, product-key memory value tables get their own AdamW whose
  schedule is the same one scaled to that peak (`sparsejax.memory.make_memory_optimizer`).
  `memory_values`: "dense" (that AdamW) or "sparse": the value tables get the lazy row-wise
  AdamW of `sparsejax.memory.sparse_optim.row_adamw` on at most `memory_value_rows` rows per step
  (same betas, weight decay and value schedule), and the clipping is
  `sparse_optim.clip_by_global_norm`: the trainer's step then gives each table's gradient and
  update as `sparse_optim.Rows` (`sparsejax.memory.row_grad`), so a step costs O(rows read x D),
  never O(N x D); untouched rows are never changed. Rows beyond `memory_value_rows` in one step
  (the highest indices) get no update, so set it to at least batch x length x heads x k (times
  the layers sharing a table).
  The warmup is capped at num_steps - 1 so that short runs still decay.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train.learning_rate,
      warmup_steps=min(train.warmup_steps, train.num_steps - 1),
      decay_steps=train.num_steps,
      end_value=train.learning_rate * train.end_lr_fraction,
  )
  phases = _phase_schedule(sparsity)
  if phases is not None and sparsity.rewind_lr:
    schedule = masks.rewind_lr(schedule, prune_steps(phases, train.num_steps))
  make_adamw = _adamw_maker(train, phases if phases is not None and sparsity.reset_optimizer
                            else None)
  value_schedule = schedule
  if train.memory_value_learning_rate is not None:
    ratio = train.memory_value_learning_rate / train.learning_rate
    value_schedule = lambda step: ratio * schedule(step)
  memory_values = train.get("memory_values", "dense")
  if memory_values not in MEMORY_VALUES:
    raise ValueError(f"config.train.memory_values={memory_values!r}; allowed: {MEMORY_VALUES}")
  if memory_values == "sparse":
    value_tx = sparse_optim.row_adamw(value_schedule, _value_rows(train), b1=train.b1,
                                      b2=train.b2, weight_decay=train.weight_decay)
    update = optax.multi_transform(
        {memory.optim.DEFAULT_LABEL: make_adamw(schedule), memory.optim.VALUE_LABEL: value_tx},
        memory.value_lr_labels)
    return optax.chain(sparse_optim.clip_by_global_norm(train.grad_clip), update), schedule
  if train.memory_value_learning_rate is None:
    update = make_adamw(schedule)
  else:
    update = memory.make_memory_optimizer(make_adamw, schedule, value_schedule)
  return optax.chain(optax.clip_by_global_norm(train.grad_clip), update), schedule


def _phase_schedule(sparsity: ml_collections.ConfigDict | None) -> masks.Schedule | None:
  """The sparsity schedule when `sparsity` asks the optimizer to follow it, else None."""
  if sparsity is None or not sparsity.enabled or not (sparsity.get("reset_optimizer")
                                                      or sparsity.get("rewind_lr")):
    return None
  name, kwargs = _named_entry("sparsity.schedule", sparsity.schedule)
  if name == "none":
    raise ValueError("config.sparsity.reset_optimizer / rewind_lr follow the mask updates, but "
                     "config.sparsity.schedule is 'none' (the mask never changes)")
  try:
    schedule = masks.make_schedule(name, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.sparsity.schedule={name!r}: {e}") from None
  if schedule.quantity != "sparsity":
    raise ValueError(f"config.sparsity.reset_optimizer / rewind_lr follow a schedule of the "
                     f"sparsity (e.g. 'acdc', 'polynomial'), not {name!r}, whose values are "
                     f"{schedule.quantity}s (every update would reset / rewind)")
  return schedule


def prune_steps(schedule: masks.Schedule, num_steps: int) -> list[int]:
  """The steps < num_steps at which `schedule` updates the mask to a sparsity > 0."""
  sparsity_T, update_T = jax.vmap(schedule)(jnp.arange(num_steps))
  steps = np.flatnonzero(np.asarray(update_T) & (np.asarray(sparsity_T) > 0))
  if not steps.size:
    raise ValueError(f"config.sparsity.rewind_lr: the schedule {schedule} prunes at no step "
                     f"before train.num_steps={num_steps}")
  return [int(t) for t in steps]


def _adamw_maker(train: ml_collections.ConfigDict,
                 reset: masks.Schedule | None) -> Callable[[optax.ScalarOrSchedule],
                                                           optax.GradientTransformation]:
  """lr -> AdamW (decay on >= 2-D leaves); with `reset`, its moments and count restart after
  each update step of that schedule, the learning rate applied outside the reset."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if reset is None:
    return lambda lr: optax.adamw(lr, b1=train.b1, b2=train.b2,
                                  weight_decay=train.weight_decay, mask=decay_mask)
  adam_wd = optax.chain(optax.scale_by_adam(b1=train.b1, b2=train.b2),
                        optax.add_decayed_weights(train.weight_decay, mask=decay_mask))
  return lambda lr: optax.chain(masks.reset_on_schedule(adam_wd, reset),
                                optax.scale_by_learning_rate(lr))


def _value_rows(train: ml_collections.ConfigDict) -> int:
  """The static number of value-table rows the sparse optimizer updates per step, checked."""
  rows = train.get("memory_value_rows")
  if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
    raise ValueError(f"config.train.memory_value_rows={rows!r} must be a positive int with "
                     f"memory_values='sparse' (batch_size x seq_len x heads x k per table)")
  return rows


def check_sam(train: ml_collections.ConfigDict, params: Any) -> None:
  """Raises ValueError when `train.sam_rho` / `train.sam_rule` cannot work on `params` (plain or
  abstract): rho < 0 or not a number, an invalid regex, with rho > 0 a rule matching no param,
  or (`memory_values="sparse"`) one matching a memory value table, whose gradient is then in
  row form. rho = 0 (SAM off) ignores the rule."""
  rho, rule = train.sam_rho, train.sam_rule
  if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho < 0:
    raise ValueError(f"config.train.sam_rho={rho!r} must be a number >= 0 (0 = SAM off)")
  if rho == 0:
    return
  try:
    pattern = re.compile(rule)
  except (re.error, TypeError) as e:
    raise ValueError(f"config.train.sam_rule={rule!r} is not a regex: {e}") from None
  paths = [masks.path_str(key_path)
           for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  matched = [path for path in paths if pattern.search(path)]
  if not matched:
    raise ValueError(f"config.train.sam_rule={rule!r} (with config.train.sam_rho={rho}) matches "
                     f"no param; the params are {', '.join(paths)}")
  if train.get("memory_values") == "sparse":
    labels = dict(zip(paths, jax.tree.leaves(memory.value_lr_labels(params))))
    tables = [path for path in matched if labels[path] == memory.optim.VALUE_LABEL]
    if tables:
      raise ValueError(f"config.train.sam_rule={rule!r} matches the memory value tables "
                       f"{', '.join(tables)}, whose gradients are rows under config.train."
                       f"memory_values='sparse': leave them out of the rule or use 'dense'")


def _named_entry(section: str, entry: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """("name", other fields) of a free-form `{"name": ..., **kwargs}` config entry."""
  kwargs = entry.to_dict()
  if "name" not in kwargs:
    raise ValueError(f"config.{section} needs a 'name' field, got keys {sorted(kwargs)}")
  name = kwargs.pop("name")
  return name, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def check_sparsity(sparsity: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `sparsity.init` / `init_batches` if the initial mask cannot be
  scored (an unknown init, or a gradient-scored one without batches)."""
  try:
    needs = masks.init_needs(sparsity.init)
  except ValueError as e:
    raise ValueError(f"config.sparsity.init: {e}") from None
  if needs != "params" and sparsity.init_batches < 1:
    raise ValueError(f"config.sparsity.init_batches={sparsity.init_batches} must be >= 1 for "
                     f"init={sparsity.init!r} (it needs {needs})")


def initial_mask_inputs(sparsity: ml_collections.ConfigDict, grad_fn: Callable[[Any, Any], Any],
                        params: Any, batches: Callable[[int], list[Any]]) -> dict[str, Any]:
  """What the mask init declares it needs (`sparsejax.masks.init_needs`), computed from
  `grad_fn(params, batch)` on `batches(sparsity.init_batches)` only when it needs gradients."""
  if masks.init_needs(sparsity.init) == "params":
    return {}
  return jax.device_get(masks.init_inputs(sparsity.init, grad_fn, params,
                                          batches(sparsity.init_batches)))


def make_sparse_optimizer(tx: optax.GradientTransformation, sparsity: ml_collections.ConfigDict,
                          params: Any, seed: int, init_kwargs: dict[str, Any] | None = None,
                          init: str | None = None, overrides: dict[str, float] | None = None):
  """(`tx` under `sparsejax.masks.wrap`, the initial `Mask`) as `config.sparsity` describes.

  The initial mask keeps a `sparsity.density` fraction of the sparsified leaves of `params`,
  spread over the leaves by `sparsity.distribution`, scored by `sparsity.init` (random draws
  from fold_in(PRNGKey(seed), MASK_RNG_STREAM); gradient-scored inits need `init_kwargs` from
  `initial_mask_inputs`; `init` scores with another init instead; `overrides` {path regex:
  density} fixes some leaves' densities, as in `masks.layer_densities`); the updater and
  schedule come from the registries by name.
  """
  check_sparsity(sparsity)
  rules = tuple((pattern, spec.to_dict() if hasattr(spec, "to_dict") else spec)
                for pattern, spec in sparsity.rules)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), MASK_RNG_STREAM)
  try:
    mask = masks.make_mask(params, sparsity.density, sparsity.distribution, rules,
                           init=init or sparsity.init, key=key, power=sparsity.erk_power,
                           overrides=overrides, **(init_kwargs or {}))
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


def masked_params(params: Any, opt_state: Any) -> Any:
  """The weights the model runs with under sparse training: params * mask (mask from `wrap`)."""
  return masks.get_mask(opt_state).apply(params)
