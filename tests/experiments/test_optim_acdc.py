"""config.sparsity.reset_optimizer / rewind_lr: AC/DC's optimizer recipe in the run's optimizer."""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import optim
from sparsejax import masks

LR, WARMUP, STEPS, B1, B2, WD = 0.1, 2, 12, 0.9, 0.95, 0.1
PHASES = {"name": "acdc", "sparsity": 0.5, "begin": 2, "phase_steps": 2, "end": 10}


def _configs(reset: bool, rewind: bool):
  train = ml_collections.ConfigDict(dict(
      num_steps=STEPS, learning_rate=LR, warmup_steps=WARMUP, end_lr_fraction=0.0,
      weight_decay=WD, b1=B1, b2=B2, grad_clip=1e9, memory_value_learning_rate=None))
  sparsity = ml_collections.ConfigDict(dict(
      enabled=True, schedule=ml_collections.ConfigDict(PHASES), reset_optimizer=reset,
      rewind_lr=rewind))
  return train, sparsity


def _base_lr(t: int) -> float:
  """Linear warmup to LR over WARMUP steps, then cosine decay to 0 at STEPS (optax's form)."""
  if t < WARMUP:
    return LR * t / WARMUP
  return 0.5 * LR * (1 + math.cos(math.pi * (t - WARMUP) / (STEPS - WARMUP)))


def _reference_updates(grads, param, reset: bool, rewind: bool):
  """AdamW by hand; moments and count zeroed after the schedule's update steps 2, 4, 6, 8, 10;
  the learning rate restarted after its prune steps 2, 6, 10."""
  updates_steps, prunes = (2, 4, 6, 8, 10), (2, 6, 10)
  m = v = np.zeros_like(param)
  count = 0
  out = []
  for t, g in enumerate(grads):
    count += 1
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    adam = (m / (1 - B1 ** count)) / (np.sqrt(v / (1 - B2 ** count)) + 1e-8)
    last = max((p for p in prunes if p < t), default=None)
    lr = _base_lr(t - last - 1 if rewind and last is not None else t)
    out.append(-lr * (adam + WD * param))
    if reset and t in updates_steps:
      m = v = np.zeros_like(param)
      count = 0
  return out


def test_prune_steps_of_the_acdc_schedule_are_the_sparse_phase_starts():
  schedule = masks.make_schedule(**{k: v for k, v in PHASES.items() if k != "name"},
                                 name="acdc")
  assert optim.prune_steps(schedule, STEPS) == [2, 6, 10]
  assert optim.prune_steps(schedule, 7) == [2, 6]


@pytest.mark.parametrize("reset, rewind", [(True, True), (True, False), (False, True)])
def test_reset_and_rewind_match_a_hand_written_adamw(reset, rewind):
  tx, schedule = optim.make_optimizer(*_configs(reset, rewind))
  param = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
  grads = np.random.default_rng(0).normal(size=(STEPS, 2, 2)).astype(np.float32)
  state = tx.init(jnp.asarray(param))
  expected = _reference_updates(grads.astype(np.float64), param.astype(np.float64), reset,
                                rewind)
  for t in range(STEPS):
    update, state = tx.update(jnp.asarray(grads[t]), state, jnp.asarray(param))
    np.testing.assert_allclose(np.asarray(update), expected[t], rtol=2e-4, atol=1e-7,
                               err_msg=f"step {t}")
  assert math.isclose(float(schedule(7)), _base_lr(7 - 6 - 1 if rewind else 7), rel_tol=1e-5)


def test_following_a_schedule_that_never_changes_the_mask_is_an_error():
  train, sparsity = _configs(True, False)
  sparsity.schedule = ml_collections.ConfigDict({"name": "none"})
  with pytest.raises(ValueError, match="schedule is 'none'"):
    optim.make_optimizer(train, sparsity)


@pytest.mark.parametrize("schedule, match", [
    ({"name": "cosine", "drop_fraction": 0.3, "end": 8, "update_every": 2}, "drop_fractions"),
    ({"name": "acdc", "bogus": 1}, "config.sparsity.schedule='acdc': .*bogus"),
])
def test_schedules_the_recipe_cannot_follow_are_errors(schedule, match):
  train, sparsity = _configs(False, True)
  sparsity.schedule = ml_collections.ConfigDict(schedule)
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(train, sparsity)
