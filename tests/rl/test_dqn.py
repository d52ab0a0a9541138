"""DQN pieces against naive loops."""
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.masks import Mask
from sparsejax.rl import dqn


def test_td_targets_match_naive_loop():
  q_next = np.array([[1.0, 3.0], [-2.0, -1.0], [0.5, 0.2]], np.float32)
  reward = np.array([1.0, 0.0, 2.0], np.float32)
  terminated = np.array([False, True, False])
  expected = []
  for b in range(3):
    bootstrap = 0.0 if terminated[b] else max(q_next[b])
    expected.append(reward[b] + 0.9 * bootstrap)
  got = dqn.td_targets(jnp.asarray(q_next), jnp.asarray(reward), jnp.asarray(terminated), 0.9)
  np.testing.assert_allclose(got, [3.7, 0.0, 2.45], rtol=1e-6)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_td_loss_matches_naive_computation_with_mask():
  params = dqn.init_qnet(jax.random.key(0), (3, 5, 2))
  target = dqn.init_qnet(jax.random.key(1), (3, 5, 2))
  keep = {"layer_0": {"kernel": np.arange(15).reshape(3, 5) % 2 == 0, "bias": np.ones(5, bool)},
          "layer_1": {"kernel": np.ones((5, 2), bool), "bias": np.ones(2, bool)}}
  mask = Mask.from_leaves(keep, {"layer_0/kernel": "unstructured"})
  rng = np.random.default_rng(0)
  batch = dqn.Batch(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.asarray([0, 1, 1, 0]),
                    jnp.asarray([1.0, 1.0, 0.0, 1.0]),
                    jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    jnp.asarray([False, False, True, False]))

  def mlp(p, x, m=None):
    w0 = np.asarray(p["layer_0"]["kernel"]) * (keep["layer_0"]["kernel"] if m else 1)
    h = np.maximum(x @ w0 + np.asarray(p["layer_0"]["bias"]), 0)
    return h @ np.asarray(p["layer_1"]["kernel"]) + np.asarray(p["layer_1"]["bias"])

  obs, next_obs = np.asarray(batch.obs, np.float64), np.asarray(batch.next_obs, np.float64)
  total = 0.0
  for b in range(4):
    q = mlp(params, obs[b], m=True)[int(batch.action[b])]
    y = float(batch.reward[b]) + 0.99 * (0.0 if batch.terminated[b] else
                                         mlp(target, next_obs[b]).max())
    total += (q - y) ** 2
  np.testing.assert_allclose(jax.jit(dqn.td_loss, static_argnums=4)(params, mask, target, batch,
                                                                  0.99), total / 4,
                             rtol=1e-4)


def test_replay_ring_buffer_overwrites_oldest():
  replay = dqn.replay_init(3, 1)
  rows = lambda *v: dqn.Batch(jnp.asarray(v, jnp.float32)[:, None], jnp.zeros(len(v), jnp.int32),
                              jnp.asarray(v, jnp.float32), jnp.zeros((len(v), 1)),
                              jnp.zeros(len(v), bool))
  add = jax.jit(dqn.replay_add)
  replay = add(add(replay, rows(1.0, 2.0)), rows(3.0, 4.0))
  np.testing.assert_array_equal(replay.data.reward, [4.0, 2.0, 3.0])
  assert int(replay.head) == 1 and int(replay.size) == 3
  sample = dqn.replay_sample(replay, jax.random.key(0), 32)
  assert set(np.asarray(sample.reward).tolist()) <= {2.0, 3.0, 4.0}


def test_epsilon_greedy_extremes_and_schedule():
  q = jnp.asarray([[0.0, 1.0], [2.0, -1.0]])
  np.testing.assert_array_equal(dqn.epsilon_greedy(jax.random.key(0), q, 0.0), [1, 0])
  np.testing.assert_allclose([dqn.linear_epsilon(t, 1.0, 0.1, 10) for t in (0, 5, 10, 20)],
                             [1.0, 0.55, 0.1, 0.1], rtol=1e-6)
