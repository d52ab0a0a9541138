"""AC/DC: the phase pattern on a hand-worked step sequence, the mask density in each phase, and
the whole optimizer state reset at phase changes, against a NumPy simulation; LR rewinding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.masks.acdc_training import ACDCPhases, acdc, rewind_lr
from sparsejax.masks.mask import Mask
from sparsejax.masks.wrap import get_mask

PHASES = dict(sparsity=0.75, begin=2, phase_steps=2, end=6)


def test_phase_pattern_by_hand():
  schedule = ACDCPhases(**PHASES)
  values, updates = zip(*[schedule(t) for t in range(9)])
  # dense warm-up (0, 1), sparse (2, 3), dense (4, 5), final sparse from 6 on.
  np.testing.assert_allclose(values, [0, 0, .75, .75, 0, 0, .75, .75, .75])
  np.testing.assert_array_equal(updates, [0, 0, 1, 0, 1, 0, 1, 0, 0])
  assert schedule.prune_steps() == [2, 6]


def test_rejects_an_end_that_does_not_start_a_sparse_phase():
  with pytest.raises(ValueError, match="2 \\* phase_steps=4"):
    ACDCPhases(sparsity=0.5, begin=2, phase_steps=2, end=4)


def _grads(t):
  rng = np.random.default_rng(t)
  return {"kernel": rng.normal(size=(4, 4)).astype(np.float32),
          "bias": rng.normal(size=(4,)).astype(np.float32)}


# base(c) = 0.1 - 0.01 c rewound after the prunes at 2 and 6: base(t), base(t - 3), base(t - 7).
REWOUND_LR = [0.1, 0.09, 0.08, 0.1, 0.09, 0.08, 0.07, 0.1, 0.09]


def _numpy_acdc(w0, steps, beta=0.9):
  """SGD with momentum under AC/DC: masked grads, trace reset and mask change after steps 2, 4,
  6; the sparse mask keeps the 4 largest |w| of the 16 kernel entries; lr from REWOUND_LR."""
  w, m, trace = w0.copy(), np.ones((4, 4), bool), np.zeros((4, 4))
  densities, kernels = [], []
  for t in range(steps):
    trace = np.where(m, _grads(t)["kernel"], 0) + beta * trace
    w = np.where(m, w - REWOUND_LR[t] * trace, 0)
    if t in (2, 4, 6):
      trace = np.zeros_like(trace)
      if t in (2, 6):
        m = np.zeros(16, bool)
        m[np.argsort(-np.abs(w).ravel(), kind="stable")[:4]] = True
        m = m.reshape(4, 4)
      else:
        m = np.ones((4, 4), bool)
      w = np.where(m, w, 0)
    densities.append(m.mean())
    kernels.append(w)
  return densities, kernels


def test_training_follows_the_numpy_simulation_with_resets():
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),
            "bias": jnp.zeros(4, jnp.float32)}
  template = Mask.from_leaves({"kernel": np.zeros((4, 4), bool), "bias": np.ones(4, bool)},
                              {"kernel": "unstructured"})
  phases = ACDCPhases(**PHASES)
  lr = rewind_lr(lambda count: 0.1 - 0.01 * count, phases.prune_steps())
  tx = acdc(optax.trace(decay=0.9), phases, template, learning_rate=lr)
  state = tx.init(params)
  step = jax.jit(tx.update)
  want_density, want_kernel = _numpy_acdc(np.asarray(params["kernel"], np.float64), 9)
  assert get_mask(state).density()["kernel"] == 1.0  # dense warm-up
  for t in range(9):
    updates, state = step(_grads(t), state, params)
    params = optax.apply_updates(params, updates)
    assert get_mask(state).density()["kernel"] == want_density[t]
    np.testing.assert_allclose(params["kernel"], want_kernel[t], rtol=1e-5, atol=1e-6)
    traces = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (4, 4)
              and x.dtype == jnp.float32]
    assert traces and all((np.asarray(x) == 0).all() == (t in (2, 4, 6)) for x in traces)
  assert want_density == [1, 1, .25, .25, 1, 1, .25, .25, .25]


def test_rewound_lr_restarts_after_each_prune():
  lr = rewind_lr(lambda count: 10.0 - count, prune_steps=[2, 6], rewind_to=1)
  # before the first prune base(t); after prune p: base(1 + t - p - 1).
  np.testing.assert_allclose([float(lr(t)) for t in range(9)], [10, 9, 8, 9, 8, 7, 6, 9, 8])
  np.testing.assert_allclose(jax.jit(lr)(jnp.int32(7)), 9.0)
