"""DQN pieces as pure functions: Q-network MLP, TD target and loss, replay ring buffer, ε-greedy.

  y = r + γ (1 − terminated) max_a' Q_target(s', a'),   L = mean_B (Q_online(s, a) − y)²

Mnih et al. (2015), "Human-level control through deep reinforcement learning". The Q-network is
a plain dict of {"layer_i": {"kernel", "bias"}} so a `sparsejax.masks.Mask` mirrors it.
"""
import flax
import jax
import jax.numpy as jnp

from sparsejax.masks import Mask


def init_qnet(key: jax.Array, sizes: tuple[int, ...]) -> dict:
  """MLP params for widths `sizes` = (obs_dim, hidden..., num_actions); LeCun-normal kernels."""
  if len(sizes) < 2 or min(sizes) < 1:
    raise ValueError(f"sizes must list >= 2 positive widths, got {sizes}")
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"layer_{i}": {"kernel": jax.random.normal(k, (d_in, d_out)) / jnp.sqrt(d_in),
                         "bias": jnp.zeros((d_out,))}
          for i, (k, d_in, d_out) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def q_values(params: dict, obs_BO: jax.Array) -> jax.Array:
  """Q(s, ·) of shape (B, A): ReLU MLP, linear last layer."""
  h = obs_BO
  n = len(params)
  for i in range(n):
    layer = params[f"layer_{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return h


def td_targets(q_next_BA: jax.Array, reward_B: jax.Array, terminated_B: jax.Array,
               gamma: float) -> jax.Array:
  """y = r + γ (1 − terminated) max_a' Q_target(s', a'), no gradient through the target."""
  bootstrap = jnp.max(jax.lax.stop_gradient(q_next_BA), axis=-1)
  return reward_B + gamma * (1.0 - terminated_B.astype(jnp.float32)) * bootstrap


@flax.struct.dataclass
class Batch:
  """Transitions: obs (B, O), action (B,), reward (B,), next_obs (B, O), terminated (B,)."""

  obs: jax.Array
  action: jax.Array
  reward: jax.Array
  next_obs: jax.Array
  terminated: jax.Array


def td_loss(params: dict, mask: Mask, target_params: dict, batch: Batch, gamma: float
            ) -> jax.Array:
  """Mean squared TD error of the masked online net against the target net's bootstrap."""
  q_BA = q_values(mask.apply(params), batch.obs)
  q_B = jnp.take_along_axis(q_BA, batch.action[:, None], axis=-1)[:, 0]
  y_B = td_targets(q_values(target_params, batch.next_obs), batch.reward, batch.terminated,
                   gamma)
  return jnp.mean((q_B - y_B) ** 2)


@flax.struct.dataclass
class Replay:
  """Ring buffer of `Batch` rows, capacity N: `size` rows valid, `head` the next row written."""

  data: Batch
  head: jax.Array
  size: jax.Array


def replay_init(capacity: int, obs_dim: int) -> Replay:
  """An empty buffer of `capacity` rows."""
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  data = Batch(jnp.zeros((capacity, obs_dim)), jnp.zeros((capacity,), jnp.int32),
               jnp.zeros((capacity,)), jnp.zeros((capacity, obs_dim)),
               jnp.zeros((capacity,), jnp.bool_))
  return Replay(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def replay_add(replay: Replay, rows: Batch) -> Replay:
  """Write the M rows of `rows` at head, head + 1, ... (mod N), overwriting the oldest."""
  capacity = replay.data.reward.shape[0]
  m = rows.reward.shape[0]
  idx = (replay.head + jnp.arange(m)) % capacity
  data = jax.tree.map(lambda buf, new: buf.at[idx].set(new), replay.data, rows)
  return Replay(data, (replay.head + m) % capacity, jnp.minimum(replay.size + m, capacity))


def replay_sample(replay: Replay, key: jax.Array, batch_size: int) -> Batch:
  """`batch_size` rows drawn uniformly with replacement among the valid rows."""
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(replay.size, 1))
  return jax.tree.map(lambda buf: buf[idx], replay.data)


def epsilon_greedy(key: jax.Array, q_BA: jax.Array, epsilon) -> jax.Array:
  """Per row: argmax_a Q with probability 1 − ε, else a uniform action."""
  k_explore, k_action = jax.random.split(key)
  explore_B = jax.random.uniform(k_explore, q_BA.shape[:1]) < epsilon
  random_B = jax.random.randint(k_action, q_BA.shape[:1], 0, q_BA.shape[-1])
  return jnp.where(explore_B, random_B, jnp.argmax(q_BA, axis=-1))


def linear_epsilon(step, start: float, end: float, decay_steps: int) -> jax.Array:
  """ε_t = start + (end − start) · min(1, t / decay_steps)."""
  return start + (end - start) * jnp.minimum(1.0, step / max(decay_steps, 1))
