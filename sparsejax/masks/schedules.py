"""Sparsity schedules: pure functions of the step -> (value, whether to update the mask now).

A schedule says two things at step t: the value the updater should use (a target sparsity for
pruning updaters, a drop fraction for dynamic sparse training) and whether the mask is updated
at this step. Both are jnp scalars, so a schedule runs inside `jit` with a traced step:

  schedule = SCHEDULES.get("polynomial")(final_sparsity=0.9, begin=0, end=1000, update_every=100)
  value, update = schedule(step)      # float32 scalar, bool scalar

`schedule.quantity` names what `value` means ("sparsity" or "drop_fraction"); `wrap` checks it
against what the updater consumes. Updates happen at t = begin + k * update_every for k >= 0,
while t < end (t <= end for the polynomial schedule, whose last update reaches the final value).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from sparsejax.registry import SCHEDULES

QUANTITIES = ("sparsity", "drop_fraction")


def _check_fraction(name: str, value: float, allow_one: bool) -> None:
  high_ok = value <= 1 if allow_one else value < 1
  if not (0 <= value and high_ok):
    allowed = "[0, 1]" if allow_one else "[0, 1)"
    raise ValueError(f"{name} must be in {allowed}, got {value}")


def _check_steps(begin: int, end: int | None, update_every: int) -> None:
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}")
  if begin < 0:
    raise ValueError(f"begin must be >= 0, got {begin}")
  if end is not None and end <= begin:
    raise ValueError(f"end must be > begin={begin}, got {end}")


def _on_grid(step: jax.Array, begin: int, update_every: int) -> jax.Array:
  """step >= begin and (step - begin) % update_every == 0."""
  return (step >= begin) & ((step - begin) % update_every == 0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base: `__call__(step) -> (value float32, update bool)`; `quantity` names the value."""

  quantity = "sparsity"

  def value_at(self, step: jax.Array) -> jax.Array:
    raise NotImplementedError

  def update_at(self, step: jax.Array) -> jax.Array:
    raise NotImplementedError

  def __call__(self, step) -> tuple[jax.Array, jax.Array]:
    step = jnp.asarray(step, jnp.int32)
    return (jnp.asarray(self.value_at(step), jnp.float32),
            jnp.asarray(self.update_at(step), jnp.bool_))


@SCHEDULES.register("one_shot")
@dataclasses.dataclass(frozen=True)
class OneShot(Schedule):
  """Prune once, at step `at`, to `sparsity`: s_t = sparsity for all t; update iff t == at."""

  sparsity: float = 0.9
  at: int = 0

  def __post_init__(self):
    _check_fraction("sparsity", self.sparsity, allow_one=False)
    if self.at < 0:
      raise ValueError(f"at must be >= 0, got {self.at}")

  def value_at(self, step):
    return jnp.full((), self.sparsity, jnp.float32)

  def update_at(self, step):
    return step == self.at


@SCHEDULES.register("polynomial")
@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
  """Gradual pruning: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^power, t clipped to [t0, end].

  t0 = begin, t0 + n Δt = end, Δt = update_every (end - begin must be a multiple of it);
  updates at t0, t0 + Δt, ..., end. power = 3 is Zhu & Gupta (2017), "To prune, or not to prune".
  """

  final_sparsity: float = 0.9
  initial_sparsity: float = 0.0
  begin: int = 0
  end: int = 1000
  update_every: int = 100
  power: float = 3.0

  def __post_init__(self):
    _check_fraction("final_sparsity", self.final_sparsity, allow_one=False)
    _check_fraction("initial_sparsity", self.initial_sparsity, allow_one=False)
    _check_steps(self.begin, self.end, self.update_every)
    if (self.end - self.begin) % self.update_every:
      raise ValueError(f"end - begin = {self.end - self.begin} must be a multiple of "
                       f"update_every={self.update_every} so that the last update reaches "
                       f"final_sparsity")
    if self.power <= 0:
      raise ValueError(f"power must be > 0, got {self.power}")

  def value_at(self, step):
    progress = jnp.clip((step - self.begin) / (self.end - self.begin), 0.0, 1.0)
    s_i, s_f = self.initial_sparsity, self.final_sparsity
    return s_f + (s_i - s_f) * (1.0 - progress) ** self.power

  def update_at(self, step):
    return _on_grid(step, self.begin, self.update_every) & (step <= self.end)


@SCHEDULES.register("constant")
@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
  """A constant value (default a drop fraction), updating every `update_every` in [begin, end)."""

  value: float = 0.3
  update_every: int = 100
  begin: int = 0
  end: int | None = None
  kind: str = "drop_fraction"

  def __post_init__(self):
    if self.kind not in QUANTITIES:
      raise ValueError(f"kind must be one of {QUANTITIES}, got {self.kind!r}")
    _check_fraction(self.kind, self.value, allow_one=self.kind == "drop_fraction")
    _check_steps(self.begin, self.end, self.update_every)

  @property
  def quantity(self):
    return self.kind

  def value_at(self, step):
    return jnp.full((), self.value, jnp.float32)

  def update_at(self, step):
    update = _on_grid(step, self.begin, self.update_every)
    return update if self.end is None else update & (step < self.end)


@SCHEDULES.register("cosine")
@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """Cosine-decaying drop fraction α/2 (1 + cos(π min(t, end) / end)); updates in [begin, end).

  Evci et al. (2020), "Rigging the Lottery" (RigL), with α = drop_fraction, T_end = end.
  """

  quantity = "drop_fraction"

  drop_fraction: float = 0.3
  end: int = 1000
  update_every: int = 100
  begin: int = 0

  def __post_init__(self):
    _check_fraction("drop_fraction", self.drop_fraction, allow_one=True)
    _check_steps(self.begin, self.end, self.update_every)

  def value_at(self, step):
    t = jnp.minimum(step, self.end).astype(jnp.float32)
    return self.drop_fraction / 2 * (1 + jnp.cos(math.pi * t / self.end))

  def update_at(self, step):
    return _on_grid(step, self.begin, self.update_every) & (step < self.end)


def make_schedule(name: str, **kwargs) -> Schedule:
  """The schedule registered as `name`, built from keyword arguments (the config entry point)."""
  return SCHEDULES.get(name)(**kwargs)
