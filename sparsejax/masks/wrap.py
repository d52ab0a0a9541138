"""optax integration: `wrap(tx, updater, schedule, initial_mask)` and `masked(tx, mask)`.

  tx = wrap(optax.adamw(1e-3), RigL(), Cosine(drop_fraction=0.3, end=5000, update_every=100), mask)
  opt_state = tx.init(params)
  ...
  w = get_mask(opt_state).apply(params)          # = params unless the updater keeps dense weights
  grads = jax.grad(loss_fn)(w)                   # dense gradient at the sparse weights
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)

The state holds the mask (a `Mask` pytree whose leaves mirror params, so they shard like params
and checkpoint with Orbax), the updater's state, the step, a PRNG key and the inner state. Each
update: the updater transforms the gradient (by default zeroing it at masked positions), the
inner optimizer runs, and updates are set so that masked weights become exactly 0 (whatever the
inner optimizer, weight decay included). On a schedule step the updater computes a new mask from
the post-step params and the step's dense gradient; pruned weights are set to exactly 0, regrown
weights start at exactly 0, and every inner-state leaf shaped like a param (Adam mu/nu, momentum
traces), found by key-path suffix and shape, is zeroed where the mask changed.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks.mask import Mask, map_param_like
from sparsejax.masks.schedules import Schedule
from sparsejax.masks.updaters import UpdateInputs, Updater

PyTree = Any


class WrapState(NamedTuple):
  """State of `wrap`: mask, updater state, step, PRNG key (raw uint32[2]), inner optimizer state."""

  mask: Mask
  updater: PyTree
  step: jax.Array
  key: jax.Array
  inner: optax.OptState


def get_mask(state: PyTree) -> Mask:
  """The current `Mask` from a `wrap` state, also when nested (e.g. inside `optax.chain`)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, WrapState))
           if isinstance(s, WrapState)]
  if not found:
    raise ValueError("no wrap state found: get_mask needs the state of sparsejax.masks.wrap(...)")
  return found[0].mask


def reset_like_params(inner: PyTree, params: PyTree, where_BOOL: PyTree) -> PyTree:
  """Zero, where `where_BOOL` is true, every leaf of `inner` that is shaped like a param.

  Matching is `map_param_like`'s (Adam mu/nu, SGD momentum traces, also inside chains and
  masked states).
  """
  return map_param_like(lambda leaf, where: jnp.where(where, jnp.zeros((), leaf.dtype), leaf),
                        inner, params, where_BOOL)


def _zero_masked_updates(updates: PyTree, params: PyTree, mask_leaves: PyTree) -> PyTree:
  """u where m else −p, so that p + u is exactly 0 at masked positions."""
  return jax.tree.map(lambda u, p, m: jnp.where(m, u, -p.astype(u.dtype)), updates, params,
                      mask_leaves)


def _check_schedule(updater: Updater, schedule: Schedule | None) -> None:
  if schedule is None:
    return
  if updater.consumes is not None and schedule.quantity != updater.consumes:
    raise ValueError(f"{type(updater).__name__} reads a {updater.consumes} schedule, got a "
                     f"{schedule.quantity} schedule {schedule!r}")


def wrap(tx: optax.GradientTransformation, updater: Updater, schedule: Schedule | None,
         initial_mask: Mask, seed: int = 0) -> optax.GradientTransformation:
  """A GradientTransformation training `tx` under a mask that `updater` evolves on `schedule`.

  `schedule` None never changes the mask. `tx.update` must be given params. Params handed to it
  are dense arrays, boxed (`nn.Partitioned`, as `model.init` returns them) or not; after the first
  update they are exactly 0 at masked positions (unless the updater keeps dense weights, see
  `Updater.dense_weights`). The state's mask mirrors params (`Mask.mirroring`).
  """
  updater.check(initial_mask)
  _check_schedule(updater, schedule)

  def init_fn(params):
    inputs = UpdateInputs(params=params, mask=initial_mask.mirroring(params))
    mask = updater.initial_mask(inputs)
    return WrapState(mask=mask, updater=updater.init(inputs.replace(mask=mask)),
                     step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(seed),
                     inner=tx.init(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("sparsejax.masks.wrap needs params: call tx.update(grads, state, params)")
    inputs = UpdateInputs(params=params, mask=state.mask, grads=grads, state=state.updater,
                          step=state.step)
    inputs = inputs.replace(state=updater.observe(inputs))
    updates, inner = tx.update(updater.grads(inputs), state.inner, params)
    if not updater.dense_weights:
      updates = _zero_masked_updates(updates, params, inputs.mask.leaves)

    def change_mask(operands):
      updates, inner, mask, ustate = operands
      new = updater.update(inputs.replace(
          params=optax.apply_updates(params, updates), mask=mask, state=ustate, value=value,
          key=jax.random.fold_in(state.key, inputs.step)))
      if not updater.dense_weights:
        changed = jax.tree.map(jnp.not_equal, mask.leaves, new.mask.leaves)
        updates = _zero_masked_updates(updates, params, new.mask.leaves)
        inner = reset_like_params(inner, params, changed)
      return updates, inner, new.mask, new.state

    mask, ustate = inputs.mask, inputs.state
    if schedule is not None:
      value, now = schedule(inputs.step)
      updates, inner, mask, ustate = jax.lax.cond(
          now, change_mask, lambda operands: operands, (updates, inner, mask, ustate))
    new_state = WrapState(mask=mask, updater=ustate, step=inputs.step + 1, key=state.key,
                          inner=inner)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def masked(tx: optax.GradientTransformation, mask: Mask | PyTree) -> optax.GradientTransformation:
  """Update only the True entries of `mask`; all others are left bit-identical.

  Gradients are zeroed at False entries before `tx` (so its moments stay 0 there) and the
  updates there are −0.0 (p + (−0.0) == p bitwise, also for p = ±0), even with weight decay.
  For FISH-style sparse fine-tuning, SAM on a subset, sparse adapters.
  """
  leaves = mask.leaves if isinstance(mask, Mask) else mask

  def init_fn(params):
    return tx.init(params)

  def update_fn(grads, state, params=None):
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, leaves)
    updates, state = tx.update(grads, state, params)
    updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.asarray(-0.0, u.dtype)), updates,
                           leaves)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
