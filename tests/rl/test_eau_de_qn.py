"""EauDeQN's adaptation rule on a hand-worked case, and a few jit'ed training steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks import Mask
from sparsejax.rl import EauDeQNConfig, init_state, kernel_sparsity, online_sparsities, train_step
from sparsejax.rl.eau_de_qn import select_and_prune


def test_online_sparsities_hand_worked():
  # s* = 0.4: density 0.6 times (1 - v) for v = 0, 0.1, 0.5.
  np.testing.assert_allclose(online_sparsities(0.4, jnp.asarray([0.0, 0.1, 0.5])),
                             [0.4, 0.46, 0.7], rtol=1e-6)


def _stack(*trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def test_select_and_prune_hand_worked():
  w1 = np.array([[0.9, -0.1, 0.5, 0.05], [-0.7, 0.3, 0.02, 0.6]], np.float32)
  m1 = np.ones((2, 4), bool)
  m1[0, 3] = m1[1, 2] = False                        # net 1 is 25 % sparse
  net = lambda w: {"layer_0": {"kernel": jnp.asarray(w), "bias": jnp.asarray([1.0, 2, 3, 4])}}
  mask = lambda m: Mask.from_leaves({"layer_0": {"kernel": m, "bias": np.ones(4, bool)}},
                                    {"layer_0/kernel": "unstructured"})
  params_K = _stack(net(np.full((2, 4), 5.0, np.float32)), net(w1))
  masks_K = _stack(mask(np.ones((2, 4), bool)), mask(m1))
  opt_K = {"count": jnp.asarray([5, 9])}
  target, p_K, m_K, o_K, k_star = jax.jit(select_and_prune)(
      params_K, masks_K, opt_K, jnp.asarray([0.5, 0.2]), jnp.asarray([0.0, 0.5]))
  assert int(k_star) == 1                             # the smaller loss
  np.testing.assert_array_equal(target["layer_0"]["kernel"], np.where(m1, w1, 0.0))
  np.testing.assert_array_equal(p_K["layer_0"]["kernel"], np.stack([w1, w1]))
  np.testing.assert_array_equal(o_K["count"], [9, 9])
  # v = 0 keeps the chosen mask; v = 0.5: s = 1 - 0.75 * 0.5 = 0.625, keep 3 of 8 by |w|
  # among the active weights: 0.9, -0.7, 0.6.
  kept = np.zeros((2, 4), bool)
  kept[0, 0] = kept[1, 0] = kept[1, 3] = True
  np.testing.assert_array_equal(m_K.leaves["layer_0"]["kernel"], np.stack([m1, kept]))
  assert np.all(m_K.leaves["layer_0"]["bias"])


def test_dense_dqn_target_update_is_a_copy():
  params = {"layer_0": {"kernel": jnp.asarray([[1.0, -2.0]]), "bias": jnp.asarray([0.5, 0.0])}}
  mask = Mask.from_leaves(jax.tree.map(lambda a: jnp.ones(a.shape, bool), params),
                          {"layer_0/kernel": "unstructured"})
  target, p_K, m_K, _, _ = jax.jit(select_and_prune)(
      _stack(params), _stack(mask), {"n": jnp.zeros(1)}, jnp.asarray([3.0]), jnp.asarray([0.0]))
  np.testing.assert_array_equal(target["layer_0"]["kernel"], [[1.0, -2.0]])
  assert np.all(m_K.leaves["layer_0"]["kernel"])


def test_jitted_training_steps():
  config = EauDeQNConfig(speeds=(0.0, 0.5), hidden=(8,), env_steps=40, n_envs=2, batch_size=4,
                         buffer_size=16, target_every=2)
  step = jax.jit(train_step, static_argnums=0)
  state = init_state(config, jax.random.key(0))
  for _ in range(4):
    state = step(config, state)
  assert int(state.step) == 4 and int(state.replay.size) == 8
  assert int(state.picks_K.sum()) == 2
  assert np.all(np.isfinite(jax.tree.leaves(state.params_K)[0]))
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  second = lambda tree: jax.tree.map(lambda a: a[1], tree)
  # Net 0 is as sparse as the target (pruned weights are exactly 0 in it); net 1 keeps
  # round(0.5 (1 - s*) 48) of the 4·8 + 8·2 = 48 kernel weights.
  kernels = [state.target[f"layer_{i}"]["kernel"] for i in range(2)]
  target_sparsity = sum(float(jnp.sum(k == 0)) for k in kernels) / 48
  assert float(kernel_sparsity(first(state.masks_K))) == pytest.approx(target_sparsity)
  kept = round(0.5 * (1 - target_sparsity) * 48)
  assert float(kernel_sparsity(second(state.masks_K))) == pytest.approx(1 - kept / 48)
  assert (target_sparsity > 0) == (int(state.picks_K[1]) > 0)   # only the v = 0.5 net prunes
