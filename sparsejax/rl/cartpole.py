"""CartPole in pure JAX: `reset` and `step` are jit-able and vmappable pure functions.

Classic cart-pole of Barto, Sutton & Anderson (1983) with gym's CartPole-v1 constants and
explicit Euler integration (gym's default "euler"), step τ = 0.02 s:

  temp  = (F + m_p l θ̇² sin θ) / (m_c + m_p)
  θ̈    = (g sin θ − cos θ · temp) / (l (4/3 − m_p cos² θ / (m_c + m_p)))
  ẍ    = temp − m_p l θ̈ cos θ / (m_c + m_p)
  x ← x + τ ẋ,  ẋ ← ẋ + τ ẍ,  θ ← θ + τ θ̇,  θ̇ ← θ̇ + τ θ̈

with F = ±10 N (action 1 pushes right), g = 9.8, m_c = 1, m_p = 0.1, l = 0.5 (half the pole).
Reward 1 per step (the terminating step included); the episode terminates when |x| > 2.4 or
|θ| > 12° and is truncated after 500 steps. Reset draws each state variable from
U(−0.05, 0.05).

We write the environment instead of depending on gymnax: one small environment does not justify
a new dependency, and the dynamics fit in twenty lines.
"""
import flax
import jax
import jax.numpy as jnp

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
HALF_LENGTH = 0.5
FORCE = 10.0
TAU = 0.02
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * jnp.pi / 360
MAX_STEPS = 500
NUM_ACTIONS = 2
OBS_DIM = 4


@flax.struct.dataclass
class CartPoleState:
  """Physical state s = (x, ẋ, θ, θ̇) as a float32 (4,) array and the step count t (int32)."""

  s: jax.Array
  t: jax.Array


def reset(key: jax.Array) -> tuple[CartPoleState, jax.Array]:
  """A fresh episode: (state, observation) with s ~ U(−0.05, 0.05)^4, t = 0."""
  s = jax.random.uniform(key, (OBS_DIM,), jnp.float32, -0.05, 0.05)
  return CartPoleState(s, jnp.zeros((), jnp.int32)), s


def dynamics(s: jax.Array, action: jax.Array) -> jax.Array:
  """One Euler step of the cart-pole equations above; `action` in {0, 1} (left, right)."""
  x, x_dot, theta, theta_dot = s[0], s[1], s[2], s[3]
  force = jnp.where(action == 1, FORCE, -FORCE)
  total = MASS_CART + MASS_POLE
  pole_ml = MASS_POLE * HALF_LENGTH
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  temp = (force + pole_ml * theta_dot ** 2 * sin) / total
  theta_acc = (GRAVITY * sin - cos * temp) / (
      HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos ** 2 / total))
  x_acc = temp - pole_ml * theta_acc * cos / total
  return jnp.stack([x + TAU * x_dot, x_dot + TAU * x_acc,
                    theta + TAU * theta_dot, theta_dot + TAU * theta_acc])


def step(state: CartPoleState, action: jax.Array
         ) -> tuple[CartPoleState, jax.Array, jax.Array, jax.Array, jax.Array]:
  """(next state, next observation, reward, terminated, truncated) for one action.

  terminated: |x| > 2.4 or |θ| > 12° after the step (no bootstrapping past it); truncated: the
  500th step reached without terminating (a time limit, so value targets still bootstrap).
  """
  s = dynamics(state.s, action)
  t = state.t + 1
  terminated = (jnp.abs(s[0]) > X_LIMIT) | (jnp.abs(s[2]) > THETA_LIMIT)
  truncated = (t >= MAX_STEPS) & ~terminated
  return CartPoleState(s, t), s, jnp.ones((), jnp.float32), terminated, truncated


def step_auto_reset(state: CartPoleState, action: jax.Array, key: jax.Array):
  """`step`, then a `reset` where the episode ended; returns (state, obs to act on, next obs of
  the transition, reward, terminated, truncated)."""
  next_state, next_obs, reward, terminated, truncated = step(state, action)
  fresh_state, fresh_obs = reset(key)
  done = terminated | truncated
  state = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh_state, next_state)
  obs = jnp.where(done, fresh_obs, next_obs)
  return state, obs, next_obs, reward, terminated, truncated
