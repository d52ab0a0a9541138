"""SAE activation functions: JumpReLU and its step with straight-through threshold gradients,
per-token top-k and batch-wide top-k selection."""
import functools

import jax
import jax.numpy as jnp


def rectangle(u: jax.Array) -> jax.Array:
  """The rectangle kernel K(u) = 1[-1/2 < u < 1/2]."""
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to_threshold(g_TN: jax.Array) -> jax.Array:
  """Sums a gradient over every axis but the last (the latents), the threshold's shape."""
  return jnp.sum(g_TN, axis=tuple(range(g_TN.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre_TN: jax.Array, threshold_N: jax.Array, bandwidth: float) -> jax.Array:
  """JumpReLU z H(z - theta) with a straight-through gradient for the threshold.

  Forward: a_tn = z_tn * 1[z_tn > theta_n]. Backward: d a / d z = H(z - theta) and the
  pseudo-derivative d a / d theta = -(theta / eps) K((z - theta) / eps), K the rectangle kernel
  of width eps = `bandwidth`.
  Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
  Sparse Autoencoders"; Lieberum et al. 2024, "Gemma Scope".
  """
  return jnp.where(pre_TN > threshold_N, pre_TN, 0.0).astype(pre_TN.dtype)


def _jumprelu_fwd(pre_TN, threshold_N, bandwidth):
  return jumprelu(pre_TN, threshold_N, bandwidth), (pre_TN, threshold_N)


def _jumprelu_bwd(bandwidth, residuals, g_TN):
  pre_TN, threshold_N = residuals
  d_pre_TN = jnp.where(pre_TN > threshold_N, g_TN, 0.0)
  kernel_TN = rectangle((pre_TN - threshold_N) / bandwidth)
  d_threshold_N = -_sum_to_threshold(g_TN * kernel_TN * threshold_N / bandwidth)
  return d_pre_TN, d_threshold_N.astype(threshold_N.dtype)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_step(pre_TN: jax.Array, threshold_N: jax.Array, bandwidth: float) -> jax.Array:
  """The step H(z - theta) with a straight-through gradient for the threshold.

  Forward: 1[z_tn > theta_n]. Backward: no gradient to z, and the pseudo-derivative
  d H / d theta = -(1 / eps) K((z - theta) / eps): the derivative of the step smoothed by the
  rectangle kernel. It carries the gradient of the JumpReLU L0 penalty sum_n H(z_n - theta_n).
  Rajamanoharan et al. 2024, "Jumping Ahead".
  """
  return (pre_TN > threshold_N).astype(pre_TN.dtype)


def _step_fwd(pre_TN, threshold_N, bandwidth):
  return heaviside_step(pre_TN, threshold_N, bandwidth), (pre_TN, threshold_N)


def _step_bwd(bandwidth, residuals, g_TN):
  pre_TN, threshold_N = residuals
  kernel_TN = rectangle((pre_TN - threshold_N) / bandwidth)
  d_threshold_N = -_sum_to_threshold(g_TN * kernel_TN / bandwidth)
  return jnp.zeros_like(pre_TN), d_threshold_N.astype(threshold_N.dtype)


heaviside_step.defvjp(_step_fwd, _step_bwd)


def _max_k(values: jax.Array, k: int, approx: bool) -> tuple[jax.Array, jax.Array]:
  """(values, indices) of the k largest entries of the last axis."""
  if approx:
    return jax.lax.approx_max_k(values, k)
  return jax.lax.top_k(values, k)


def top_k_latents(pre_TN: jax.Array, k: int, *, approx: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
  """(idx_TK, vals_TK): each token's k largest pre-activations, through a ReLU.

  vals_tk = relu(z_t,idx_tk) for the k largest z_tn of token t (negative ones give 0).
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders".
  """
  vals_TK, idx_TK = _max_k(pre_TN, k, approx)
  return idx_TK, jax.nn.relu(vals_TK)


def batch_top_k_latents(pre_TN: jax.Array, k: int, *, approx: bool = False
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(token_S, latent_S, vals_S): the S = k T largest pre-activations of the whole batch.

  The T x N pre-activations are ranked together and the S = k * T largest kept (through a
  ReLU), so a token keeps k latents on average and any number in [0, N] itself.
  Bussmann et al. 2024, "BatchTopK Sparse Autoencoders".
  """
  num_tokens, num_latents = pre_TN.shape
  vals_S, flat_S = _max_k(pre_TN.reshape(-1), k * num_tokens, approx)
  return flat_S // num_latents, flat_S % num_latents, jax.nn.relu(vals_S)
