"""AC/DC: alternating compressed (sparse) and decompressed (dense) training, with learning-rate
rewinding.

  phases = ACDCPhases(sparsity=0.9, begin=1000, phase_steps=500, end=4000)
  tx = acdc(optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4)), phases, mask,
            learning_rate=rewind_lr(optax.cosine_decay_schedule(1e-3, 1000), phases.prune_steps()))
  # = wrap(chain(reset_on_schedule(adam_wd, phases), scale_by_learning_rate(lr)), ACDC(), phases,
  #   mask): the Adam state is reset at every phase change, the learning rate counts global steps;
  #   the mask is all-ones in dense phases, magnitude at the phase's sparsity in sparse ones.

Step convention (as in `wrap`): an update at step t sets the mask after the optimizer step t, so
the new phase trains from step t + 1 on.
"""
import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks.mask import Mask
from sparsejax.masks.schedules import Schedule, _check_fraction
from sparsejax.masks.updaters import Magnitude
from sparsejax.masks.wrap import wrap
from sparsejax.registry import SCHEDULES, UPDATERS

PyTree = Any


@SCHEDULES.register("acdc")
@dataclasses.dataclass(frozen=True)
class ACDCPhases(Schedule):
  """AC/DC phases: dense before `begin`, then sparse / dense phases of `phase_steps` each
  (sparse first), and sparse from `end` on (the final compressed phase).

  s_t = sparsity if t ≥ end or (t ≥ begin and ⌊(t − begin) / P⌋ even), else 0;
  updates at t = begin + k P for t ≤ end (end − begin must be a multiple of 2P, so the phase
  starting at `end` is a sparse one). Peste et al. (2021), "AC/DC: Alternating
  Compressed/DeCompressed Training of Deep Neural Networks".
  """

  sparsity: float = 0.9
  begin: int = 0
  phase_steps: int = 100
  end: int = 1000

  def __post_init__(self):
    _check_fraction("sparsity", self.sparsity, allow_one=False)
    if self.begin < 0:
      raise ValueError(f"begin must be >= 0, got {self.begin}")
    if self.phase_steps < 1:
      raise ValueError(f"phase_steps must be >= 1, got {self.phase_steps}")
    if self.end < self.begin or (self.end - self.begin) % (2 * self.phase_steps):
      raise ValueError(f"end={self.end} must be begin={self.begin} plus a multiple of "
                       f"2 * phase_steps={2 * self.phase_steps} (the final phase is sparse)")

  def sparse_at(self, step: jax.Array) -> jax.Array:
    """Whether the mask set at `step` (if it is an update step) is a sparse one."""
    phase = (step - self.begin) // self.phase_steps
    return (step >= self.end) | ((step >= self.begin) & (phase % 2 == 0))

  def value_at(self, step):
    return jnp.where(self.sparse_at(step), self.sparsity, 0.0)

  def update_at(self, step):
    return ((step >= self.begin) & ((step - self.begin) % self.phase_steps == 0)
            & (step <= self.end))

  def prune_steps(self) -> list[int]:
    """The steps that start a sparse phase: begin, begin + 2P, ..., end."""
    return list(range(self.begin, self.end + 1, 2 * self.phase_steps))


@UPDATERS.register("acdc")
@dataclasses.dataclass(frozen=True)
class ACDC(Magnitude):
  """AC/DC masks: all-ones at the start and in dense phases; at a sparse phase start, the
  magnitude mask of the dense weights at the schedule's sparsity (`Magnitude`'s per-leaf or
  global ranking over all entries, pruned weights coming back at 0 in the next dense phase).

  Drive it with `ACDCPhases` (s_t = 0 makes the mask dense again). Peste et al. (2021),
  "AC/DC: Alternating Compressed/DeCompressed Training of Deep Neural Networks".
  """

  def initial_mask(self, inputs):
    return _dense(inputs.mask)

  def update(self, inputs):
    return super().update(inputs.replace(mask=_dense(inputs.mask)))


def _dense(mask: Mask) -> Mask:
  """`mask` with every leaf all-true (structures kept)."""
  return mask.replace_leaves(jax.tree.map(jnp.ones_like, mask.leaves))


class ResetState(NamedTuple):
  """State of `reset_on_schedule`: the step and the inner state."""

  step: jax.Array
  inner: optax.OptState


def reset_on_schedule(tx: optax.GradientTransformation,
                      schedule: Schedule) -> optax.GradientTransformation:
  """`tx` whose whole state is re-initialised (`tx.init(params)`) after each update step of
  `schedule`, so every phase starts with fresh moments and step count (bias correction too;
  a learning-rate schedule inside `tx` would restart as well: keep it outside, see `acdc`).

  Peste et al. (2021), AC/DC: the optimizer state is reset at each phase change.
  """

  def init_fn(params):
    return ResetState(step=jnp.zeros((), jnp.int32), inner=tx.init(params))

  def update_fn(grads, state, params=None):
    updates, inner = tx.update(grads, state.inner, params)
    _, now = schedule(state.step)
    fresh = tx.init(params)
    inner = jax.tree.map(lambda f, s: jnp.where(now, f, s), fresh, inner)
    return updates, ResetState(step=state.step + 1, inner=inner)

  return optax.GradientTransformation(init_fn, update_fn)


def acdc(tx: optax.GradientTransformation, phases: ACDCPhases, initial_mask: Mask,
         learning_rate: optax.ScalarOrSchedule | None = None, scope: str = "per_leaf",
         densities: Any = None, seed: int = 0) -> optax.GradientTransformation:
  """AC/DC training: `wrap(chain(reset_on_schedule(tx, phases), scale_by_learning_rate(lr)),
  ACDC(densities, scope), phases, initial_mask)`.

  The whole state of `tx` (moments and counts; give it no learning rate) restarts at each phase
  change; `learning_rate` (a float or a schedule of the global step, e.g. `rewind_lr`) is applied
  after it, outside the reset; None leaves `tx`'s updates unscaled. `initial_mask` only names the
  sparsified leaves and their structures. Peste et al. (2021), "AC/DC: Alternating
  Compressed/DeCompressed Training of Deep Neural Networks".
  """
  inner = reset_on_schedule(tx, phases)
  if learning_rate is not None:
    inner = optax.chain(inner, optax.scale_by_learning_rate(learning_rate))
  return wrap(inner, ACDC(densities=densities, scope=scope), phases, initial_mask, seed)


def rewind_lr(base: optax.Schedule, prune_steps: Sequence[int],
              rewind_to: int = 0) -> optax.Schedule:
  """`base` restarted after every prune: lr(t) = base(rewind_to + t − p − 1), p the last prune
  step before t (base(t) before the first prune).

  Prune steps follow `wrap`'s convention (the mask changes after the optimizer step p, so step
  p + 1 is the first one retrained at base(rewind_to)). Renda, Frankle & Carbin (2020),
  "Comparing Rewinding and Fine-tuning in Neural Network Pruning" (learning-rate rewinding).
  """
  if not prune_steps or any(p < 0 for p in prune_steps):
    raise ValueError(f"prune_steps must be a non-empty list of steps >= 0, got {prune_steps!r}")
  if rewind_to < 0:
    raise ValueError(f"rewind_to must be >= 0, got {rewind_to}")
  prunes = jnp.asarray(sorted(prune_steps), jnp.int32)

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    last = jnp.max(jnp.where(prunes < count, prunes, -1))
    return base(jnp.where(last >= 0, rewind_to + count - last - 1, count))

  return schedule
