"""CartPole against a naive float64 transcription of gym's CartPole-v1 step."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.rl import cartpole


def _gym_step(x, x_dot, theta, theta_dot, action):
  """gym.envs.classic_control.CartPoleEnv.step's Euler update, written out in Python floats."""
  force = 10.0 if action == 1 else -10.0
  costheta, sintheta = math.cos(theta), math.sin(theta)
  temp = (force + 0.05 * theta_dot ** 2 * sintheta) / 1.1
  thetaacc = (9.8 * sintheta - costheta * temp) / (0.5 * (4.0 / 3.0 - 0.1 * costheta ** 2 / 1.1))
  xacc = temp - 0.05 * thetaacc * costheta / 1.1
  return (x + 0.02 * x_dot, x_dot + 0.02 * xacc, theta + 0.02 * theta_dot,
          theta_dot + 0.02 * thetaacc)


def test_step_matches_hand_computed_dynamics():
  s = (0.1, -0.2, 0.05, 0.3)
  for action in (0, 1):
    state = cartpole.CartPoleState(jnp.asarray(s, jnp.float32), jnp.asarray(7, jnp.int32))
    nxt, obs, reward, terminated, truncated = jax.jit(cartpole.step)(state, jnp.asarray(action))
    np.testing.assert_allclose(obs, _gym_step(*s, action), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(nxt.s, obs)
    assert int(nxt.t) == 8 and float(reward) == 1.0
    assert not bool(terminated) and not bool(truncated)
  # Pushing right accelerates the cart right and the pole left (θ̈ lower than when pushing left).
  right = _gym_step(*s, 1)
  left = _gym_step(*s, 0)
  assert right[1] > left[1] and right[3] < left[3]


def test_termination_truncation_and_reset():
  step = jax.jit(cartpole.step)

  def run(s, t):
    state = cartpole.CartPoleState(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.int32))
    _, _, _, terminated, truncated = step(state, jnp.asarray(1))
    return bool(terminated), bool(truncated)

  assert run((2.39, 1.0, 0.0, 0.0), 0) == (True, False)      # x = 2.41 > 2.4
  assert run((-2.39, -1.0, 0.0, 0.0), 0) == (True, False)
  limit = 12 * math.pi / 180
  assert run((0.0, 0.0, limit - 0.001, 1.0), 0) == (True, False)  # θ grows by 0.02 rad
  assert run((0.0, 0.0, 0.0, 0.0), 498) == (False, False)
  assert run((0.0, 0.0, 0.0, 0.0), 499) == (False, True)     # the 500th step
  assert run((2.39, 1.0, 0.0, 0.0), 499) == (True, False)    # termination wins at the cap
  states, obs = jax.jit(jax.vmap(cartpole.reset))(jax.random.split(jax.random.key(0), 64))
  assert obs.shape == (64, 4) and np.all(np.abs(obs) <= 0.05) and np.all(states.t == 0)


def test_auto_reset_keeps_the_true_next_observation():
  state = cartpole.CartPoleState(jnp.asarray((2.39, 1.0, 0.0, 0.0)), jnp.asarray(3, jnp.int32))
  new, obs, next_obs, _, terminated, _ = cartpole.step_auto_reset(
      state, jnp.asarray(1), jax.random.key(1))
  assert bool(terminated) and int(new.t) == 0
  np.testing.assert_allclose(next_obs, _gym_step(2.39, 1.0, 0.0, 0.0, 1), rtol=1e-5)
  assert np.all(np.abs(obs) <= 0.05)
