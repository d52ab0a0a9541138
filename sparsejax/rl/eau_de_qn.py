"""Eau De Q-Network: DQN whose sparsity grows at a pace the agent picks, on CartPole.

K online networks θ_k with masks m_k learn from one shared target network θ̄ (the TD loss of a
pruned online net against the denser target is a distillation loss). Every T gradient steps:

  k* = argmin_k L̄_k                         (L̄_k: mean TD loss of net k since the last update)
  θ̄ ← m_k* ⊙ θ_k*,  s* = sparsity(m_k*)     (the least-loss online net becomes the target)
  s_k = 1 − (1 − s*)(1 − v_k)               (pruning speed v_k ∈ [0, 1), v_0 = 0)
  θ_k ← θ_k*,  m_k ← magnitude-prune(θ_k*, m_k*) to global sparsity s_k

so speed v_0 = 0 keeps one online net at the target's sparsity: when every sparser net fits the
target worse, the sparsity stops growing, and no final sparsity is set by hand. Pruning is global
magnitude pruning over the kernels (`sparsejax.masks.Magnitude(scope="global")`); pruned weights
never come back. Each replaced net also takes θ_k*'s Adam state. With K = 1 and v = (0,) this is
plain dense DQN. The agent acts ε-greedily with net 0, which is as sparse as the target.

Vincent, Faust, Tripathi, Peters & D'Eramo (2025), "Eau De Q-Network: Adaptive Distillation of
Neural Networks in Deep Reinforcement Learning". Our reading of it: the speeds as a density
factor per target update, the period-mean loss as the selection score, and acting with net 0
are our choices where the abstract leaves room.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import optax

from sparsejax.masks import Magnitude, Mask, UpdateInputs, make_mask
from sparsejax.rl import cartpole
from sparsejax.rl.dqn import (Batch, Replay, epsilon_greedy, init_qnet, linear_epsilon,
                              q_values, replay_add, replay_init, replay_sample, td_loss)


@dataclasses.dataclass(frozen=True)
class EauDeQNConfig:
  """Hyper-parameters; env_steps counts transitions over all `n_envs` parallel CartPoles."""

  speeds: tuple[float, ...] = (0.0, 0.05, 0.2)
  hidden: tuple[int, ...] = (128, 128)
  env_steps: int = 100_000
  n_envs: int = 4
  batch_size: int = 64
  gamma: float = 0.99
  learning_rate: float = 1e-3
  target_every: int = 200
  buffer_size: int = 20_000
  epsilon_start: float = 1.0
  epsilon_end: float = 0.05
  epsilon_fraction: float = 0.2
  eval_envs: int = 16

  def __post_init__(self):
    if not self.speeds or self.speeds[0] != 0.0:
      raise ValueError(f"speeds must start with 0.0 (the net kept at the target's sparsity), "
                       f"got {self.speeds}")
    if any(not 0.0 <= v < 1.0 for v in self.speeds):
      raise ValueError(f"speeds must lie in [0, 1), got {self.speeds}")
    if self.env_steps < self.n_envs or self.n_envs < 1:
      raise ValueError(f"need env_steps >= n_envs >= 1, got env_steps={self.env_steps}, "
                       f"n_envs={self.n_envs}")

  @property
  def iterations(self) -> int:
    return self.env_steps // self.n_envs


def online_sparsities(target_sparsity, speeds_K: jax.Array) -> jax.Array:
  """s_k = 1 − (1 − s*)(1 − v_k): each online net's sparsity after a target update."""
  return 1.0 - (1.0 - target_sparsity) * (1.0 - speeds_K)


def kernel_sparsity(mask: Mask) -> jax.Array:
  """Global sparsity over the mask's sparse (kernel) leaves, 1 − Σ nnz / Σ size."""
  flat = mask.flat()
  sparse = [flat[p] for p in mask.sparse_paths()]
  nnz = sum(jnp.sum(m, dtype=jnp.float32) for m in sparse)
  return 1.0 - nnz / sum(m.size for m in sparse)


def select_and_prune(params_K: dict, masks_K: Mask, opt_K, mean_loss_K: jax.Array,
                     speeds_K: jax.Array):
  """One EauDeQN target update: (target params, online params, masks, opt states, k*).

  Leaves of the `_K` trees carry a leading axis of size K; the module docstring gives the math.
  """
  k_star = jnp.argmin(mean_loss_K)
  pick = lambda tree: jax.tree.map(lambda a: a[k_star], tree)
  params, mask, opt = pick(params_K), pick(masks_K), pick(opt_K)
  sparsities_K = online_sparsities(kernel_sparsity(mask), speeds_K)
  prune = lambda s: Magnitude(scope="global").update(
      UpdateInputs(params=params, mask=mask, value=s)).mask
  new_masks_K = jax.vmap(prune)(sparsities_K)
  repeat = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (len(speeds_K),) + a.shape),
                                     tree)
  return mask.apply(params), repeat(params), new_masks_K, repeat(opt), k_star


@flax.struct.dataclass
class TrainState:
  """Everything that evolves: envs, replay, K online nets, target net, loss sums, counters."""

  env: cartpole.CartPoleState
  obs_EO: jax.Array
  replay: Replay
  params_K: dict
  masks_K: Mask
  opt_K: optax.OptState
  target: dict
  loss_sum_K: jax.Array
  picks_K: jax.Array
  step: jax.Array
  key: jax.Array


def init_state(config: EauDeQNConfig, key: jax.Array) -> TrainState:
  """Fresh envs, an empty replay, K identical dense online nets and their target copy."""
  k_env, k_net, key = jax.random.split(key, 3)
  env, obs_EO = jax.vmap(cartpole.reset)(jax.random.split(k_env, config.n_envs))
  params = init_qnet(k_net, (cartpole.OBS_DIM, *config.hidden, cartpole.NUM_ACTIONS))
  mask = make_mask(params, 1.0, init="magnitude")
  n = len(config.speeds)
  repeat = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree)
  opt = optax.adam(config.learning_rate).init(params)
  return TrainState(env, obs_EO, replay_init(config.buffer_size, cartpole.OBS_DIM),
                    repeat(params), repeat(mask), repeat(opt), params, jnp.zeros((n,)),
                    jnp.zeros((n,), jnp.int32), jnp.zeros((), jnp.int32), key)


def train_step(config: EauDeQNConfig, state: TrainState) -> TrainState:
  """One env step of every env, one Adam step of every online net, and on every T-th step the
  target update of `select_and_prune`."""
  key, k_act, k_reset, k_batch = jax.random.split(state.key, 4)
  act_net = jax.tree.map(lambda a: a[0], state.masks_K).apply(
      jax.tree.map(lambda a: a[0], state.params_K))
  epsilon = linear_epsilon(state.step, config.epsilon_start, config.epsilon_end,
                           int(config.epsilon_fraction * config.iterations))
  action_E = epsilon_greedy(k_act, q_values(act_net, state.obs_EO), epsilon)
  env, obs_EO, next_obs_EO, reward_E, term_E, _ = jax.vmap(cartpole.step_auto_reset)(
      state.env, action_E, jax.random.split(k_reset, config.n_envs))
  replay = replay_add(state.replay, Batch(state.obs_EO, action_E, reward_E, next_obs_EO, term_E))
  batch = replay_sample(replay, k_batch, config.batch_size)

  optimizer = optax.adam(config.learning_rate)

  def learn(params, mask, opt):
    loss, grads = jax.value_and_grad(td_loss)(params, mask, state.target, batch, config.gamma)
    updates, opt = optimizer.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  params_K, opt_K, loss_K = jax.vmap(learn)(state.params_K, state.masks_K, state.opt_K)
  loss_sum_K = state.loss_sum_K + loss_K
  step = state.step + 1
  speeds_K = jnp.asarray(config.speeds, jnp.float32)

  def update_target(_):
    target, p, m, o, k_star = select_and_prune(params_K, state.masks_K, opt_K,
                                               loss_sum_K / config.target_every, speeds_K)
    return target, p, m, o, jnp.zeros_like(loss_sum_K), state.picks_K.at[k_star].add(1)

  def keep(_):
    return state.target, params_K, state.masks_K, opt_K, loss_sum_K, state.picks_K

  target, params_K, masks_K, opt_K, loss_sum_K, picks_K = jax.lax.cond(
      step % config.target_every == 0, update_target, keep, None)
  return TrainState(env, obs_EO, replay, params_K, masks_K, opt_K, target, loss_sum_K, picks_K,
                    step, key)


def greedy_return(params: dict, key: jax.Array, n_envs: int) -> jax.Array:
  """Mean undiscounted return of the greedy policy over `n_envs` episodes (at most 500 steps)."""
  env, obs_EO = jax.vmap(cartpole.reset)(jax.random.split(key, n_envs))

  def body(carry, _):
    env, obs_EO, alive_E, total_E = carry
    action_E = jnp.argmax(q_values(params, obs_EO), axis=-1)
    env, obs_EO, reward_E, term_E, trunc_E = jax.vmap(cartpole.step)(env, action_E)
    total_E = total_E + alive_E * reward_E
    return (env, obs_EO, alive_E & ~(term_E | trunc_E), total_E), None

  init = (env, obs_EO, jnp.ones((n_envs,), jnp.bool_), jnp.zeros((n_envs,)))
  (_, _, _, total_E), _ = jax.lax.scan(body, init, None, length=cartpole.MAX_STEPS)
  return jnp.mean(total_E)


def train(config: EauDeQNConfig, key: jax.Array) -> tuple[TrainState, jax.Array]:
  """Run `config.iterations` train steps from `init_state`; returns (state, greedy return of
  net 0). Pure and jit-able with `config` static; vmap it over keys for seeds."""
  state = init_state(config, key)
  state, _ = jax.lax.scan(lambda s, _: (train_step(config, s), None), state, None,
                          length=config.iterations)
  net0 = jax.tree.map(lambda a: a[0], state.masks_K).apply(
      jax.tree.map(lambda a: a[0], state.params_K))
  return state, greedy_return(net0, jax.random.fold_in(key, 1), config.eval_envs)
