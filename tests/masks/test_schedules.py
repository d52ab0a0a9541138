"""Schedules against hand-worked values (Zhu–Gupta cubic, RigL cosine) and their update grids."""
import math

import jax
import numpy as np
import pytest

from sparsejax.masks import schedules
from sparsejax.registry import SCHEDULES


def values_and_updates(schedule, steps):
  out = [schedule(t) for t in steps]
  return [float(v) for v, _ in out], [bool(u) for _, u in out]


def test_polynomial_matches_zhu_gupta_by_hand():
  # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, t0 = 10, n dt = 40, s_i = 0, s_f = 0.8.
  schedule = schedules.make_schedule("polynomial", final_sparsity=0.8, begin=10, end=50,
                                     update_every=10)
  steps = [0, 5, 10, 15, 20, 30, 40, 50, 60]
  values, updates = values_and_updates(schedule, steps)
  expected = [0.0, 0.0, 0.0, 0.8 - 0.8 * (35 / 40) ** 3, 0.8 - 0.8 * 0.75 ** 3,
              0.8 - 0.8 * 0.125, 0.8 - 0.8 / 64, 0.8, 0.8]
  np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-7)
  assert updates == [False, False, True, False, True, True, True, True, False]
  assert schedule.quantity == "sparsity"


def test_polynomial_initial_sparsity_and_power():
  schedule = schedules.Polynomial(final_sparsity=0.9, initial_sparsity=0.5, begin=0, end=4,
                                  update_every=1, power=1.0)
  values, _ = values_and_updates(schedule, [0, 1, 2, 4])
  np.testing.assert_allclose(values, [0.5, 0.6, 0.7, 0.9], rtol=1e-6)


def test_cosine_drop_fraction_by_hand():
  # f(t) = a/2 (1 + cos(pi t / T_end)), a = 0.4, T_end = 100.
  schedule = SCHEDULES.get("cosine")(drop_fraction=0.4, end=100, update_every=25)
  values, updates = values_and_updates(schedule, [0, 25, 50, 100, 150, 10])
  expected = [0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2, 0.0, 0.0,
              0.2 * (1 + math.cos(math.pi / 10))]
  np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-7)
  assert updates == [True, True, True, False, False, False]
  assert schedule.quantity == "drop_fraction"


def test_one_shot_and_constant():
  one = schedules.OneShot(sparsity=0.75, at=3)
  values, updates = values_and_updates(one, range(6))
  assert updates == [False, False, False, True, False, False]
  np.testing.assert_allclose(values, 0.75)
  const = schedules.Constant(value=0.1, update_every=2, begin=1, end=7)
  values, updates = values_and_updates(const, range(9))
  assert updates == [False, True, False, True, False, True, False, False, False]
  np.testing.assert_allclose(values, 0.1, rtol=1e-6)
  assert schedules.Constant(value=0.5, kind="sparsity").quantity == "sparsity"


def test_schedule_runs_under_jit_with_a_traced_step():
  schedule = schedules.Polynomial(final_sparsity=0.8, begin=10, end=50, update_every=10)
  value, update = jax.jit(schedule)(np.int32(20))
  assert bool(update) and abs(float(value) - (0.8 - 0.8 * 0.75 ** 3)) < 1e-6


@pytest.mark.parametrize("build, message", [
    (lambda: schedules.Polynomial(final_sparsity=0.9, begin=0, end=55, update_every=10),
     "multiple of update_every"),
    (lambda: schedules.Polynomial(final_sparsity=1.0), r"final_sparsity must be in \[0, 1\)"),
    (lambda: schedules.Cosine(drop_fraction=1.5, end=10, update_every=1), "drop_fraction"),
    (lambda: schedules.Constant(update_every=0), "update_every must be >= 1"),
    (lambda: schedules.Cosine(drop_fraction=0.3, end=5, begin=5, update_every=1), "end must be >"),
    (lambda: schedules.Constant(kind="density"), "kind must be one of"),
    (lambda: schedules.make_schedule("exponential"), "unknown sparsity schedule 'exponential'"),
])
def test_bad_arguments_name_the_value(build, message):
  with pytest.raises(ValueError, match=message):
    build()
