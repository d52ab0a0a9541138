"""Sparse probability maps: sparsemax, 1.5-entmax and alpha-entmax, with exact custom gradients.

alpha-entmax(z) = argmax_{p in simplex} <p, z> + H_alpha(p), with the Tsallis entropy
H_alpha(p) = sum_i (p_i - p_i^alpha) / (alpha (alpha - 1)). Its solution is
  p_i = [(alpha - 1) z_i - tau]_+^(1 / (alpha - 1))
with the threshold tau set so that sum_i p_i = 1. alpha -> 1 gives softmax, alpha = 2 sparsemax
(the Euclidean projection of z onto the simplex); for alpha > 1 entries below the threshold get
exactly zero. Entries equal to -inf (masked) always get exactly zero probability and zero
gradient; every slice along `axis` needs at least one finite entry.

Gradients (on the support S = {i: p_i > 0}, with s_i = p_i^(2 - alpha), zero off S):
  dp/dz^T g = s * g - s * <s, g> / sum(s)
  dp_i/dalpha = (p_i - s^_i) / (alpha - 1)^2 - (p_i log p_i - s^_i sum_j p_j log p_j) / (alpha - 1)
where s^ = s / sum(s). Computed in float32 (or float64 for float64 inputs), returned in z's dtype.
Martins & Astudillo 2016, "From Softmax to Sparsemax"; Peters, Niculae & Martins 2019, "Sparse
Sequence-to-Sequence Models"; Correia, Niculae & Martins 2019, "Adaptively Sparse Transformers"
(appendix: the gradient with respect to alpha).
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BISECT_ITERS = 30


def sparsemax(z: jax.Array, axis: int = -1) -> jax.Array:
  """The Euclidean projection of z onto the probability simplex along `axis`.

  p_i = [z_i - tau]_+ with tau = (sum_{j in S} z_j - 1) / |S| over the support
  S = {i : z_i > tau}. S is found by bisecting tau until the bracket is below z's float
  resolution, then tau is computed exactly on S (no sort: XLA's CPU sort costs ~100x a softmax).
  Martins & Astudillo 2016, "From Softmax to Sparsemax".
  """
  return _along_last_axis(_sparsemax, z, _checked_axis(axis, jnp.ndim(z)))


def entmax15(z: jax.Array, axis: int = -1) -> jax.Array:
  """alpha-entmax with alpha = 1.5 along `axis`: p_i = [z_i / 2 - tau]_+^2, exact.

  With x = z / 2 and S = {i : x_i > tau}, sum_{j in S} (x_j - tau)^2 = 1 gives
  tau = mean_S(x) - sqrt((1 - |S| var_S(x)) / |S|). S is found by bisecting tau until the bracket
  is below z's float resolution, then tau is computed exactly on S.
  Peters, Niculae & Martins 2019, "Sparse Sequence-to-Sequence Models".
  """
  return _along_last_axis(_entmax15, z, _checked_axis(axis, jnp.ndim(z)))


def entmax_bisect(
    z: jax.Array,
    alpha: jax.Array | float,
    axis: int = -1,
    n_iter: int = DEFAULT_BISECT_ITERS,
) -> jax.Array:
  """alpha-entmax along `axis` for any alpha > 1, the threshold found by `n_iter` bisection steps.

  p_i = [(alpha - 1) z_i - tau]_+^(1 / (alpha - 1)); with m = max_i (alpha - 1) z_i and n the
  number of finite entries, tau lies in [m - 1, m - n^(1 - alpha)], halved `n_iter` times keeping
  sum_i p_i >= 1, then p is renormalised to sum to 1. `alpha` is a scalar or an array that
  broadcasts to z's shape without `axis` (e.g. shape (H, 1) for z_BHTS: one alpha per head), and
  is differentiable (Correia et al. 2019, appendix).
  Peters, Niculae & Martins 2019, "Sparse Sequence-to-Sequence Models"; Correia, Niculae &
  Martins 2019, "Adaptively Sparse Transformers".
  """
  if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
    raise ValueError(f"n_iter={n_iter!r}; allowed: a positive int")
  z = jnp.asarray(z)
  axis = _checked_axis(axis, z.ndim)
  alpha = jnp.asarray(alpha, _compute_dtype(z.dtype))
  batch_shape = z.shape[:axis] + z.shape[axis + 1:]
  try:
    broadcast = np.broadcast_shapes(alpha.shape, batch_shape)
  except ValueError:
    broadcast = None
  if broadcast != batch_shape:
    raise ValueError(
        f"alpha of shape {alpha.shape}; allowed: a shape that broadcasts to z's shape without "
        f"axis {axis}, {batch_shape}"
    )
  if not isinstance(alpha, jax.core.Tracer) and not np.all(np.asarray(alpha) > 1):
    raise ValueError(f"alpha={np.asarray(alpha).tolist()}; allowed: values > 1")
  return _entmax_bisect_along(z, alpha, axis, n_iter)


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _checked_axis(axis: int, ndim: int) -> int:
  """`axis` as a non-negative index into `ndim` dims, or a ValueError."""
  if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis!r}; allowed: an int in [{-ndim}, {ndim})")
  return axis % ndim


@functools.partial(jax.jit, static_argnums=(0, 2))
def _along_last_axis(fn: Callable[[jax.Array], jax.Array], z: jax.Array, axis: int) -> jax.Array:
  """fn on z with `axis` moved last, computed in float32 or wider; in z's layout and dtype."""
  z_last = jnp.moveaxis(z, axis, -1).astype(_compute_dtype(z.dtype))
  return jnp.moveaxis(fn(z_last), -1, axis).astype(z.dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _entmax_bisect_along(z: jax.Array, alpha: jax.Array, axis: int, n_iter: int) -> jax.Array:
  """entmax_bisect on checked arguments: alpha broadcasts to z's shape without `axis`."""
  bisect = lambda z_last: _entmax_bisect(z_last, alpha[..., None], n_iter)
  return _along_last_axis(bisect, z, axis)


def _shifted(z: jax.Array) -> jax.Array:
  """z - max(z) along the last axis (entmax is shift invariant): finite entries become <= 0."""
  return z - jnp.max(z, axis=-1, keepdims=True)


def _bisect_threshold(
    probs: Callable[[jax.Array], jax.Array], tau_hi: jax.Array, n_iter: int
) -> jax.Array:
  """The largest tau found in [-1, tau_hi] with sum(probs(tau)) >= 1, by `n_iter` halvings.

  `probs(tau)` is decreasing in tau with sum >= 1 at tau = -1 (for max_i x_i = 0), so the result
  lies at most 2^-n_iter below the exact threshold; its support {x > tau} covers the exact one.
  """
  def halve(_, bounds):
    tau_lo, tau_hi = bounds
    tau_mid = (tau_lo + tau_hi) / 2
    mass_ok = jnp.sum(probs(tau_mid), axis=-1, keepdims=True) >= 1
    return jnp.where(mass_ok, tau_mid, tau_lo), jnp.where(mass_ok, tau_hi, tau_mid)

  tau_lo = jnp.full(tau_hi.shape, -1.0, tau_hi.dtype)
  tau_lo, _ = jax.lax.fori_loop(0, n_iter, halve, (tau_lo, tau_hi))
  return tau_lo


def _support_iters(dtype: jnp.dtype) -> int:
  """Halvings that shrink a bracket of width 1 below the resolution of `dtype` near 1."""
  return jnp.finfo(dtype).nmant + 8


def _num_finite(z: jax.Array) -> jax.Array:
  return jnp.sum(jnp.isfinite(z), axis=-1, keepdims=True).astype(z.dtype)


def _support_moments(x: jax.Array, tau: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(|S|, mean_S(x), mean_S(x^2)) over the support S = {i : x_i > tau}."""
  in_support = x > tau
  x_on_support = jnp.where(in_support, x, 0.0)
  size = jnp.sum(in_support, axis=-1, keepdims=True).astype(x.dtype)
  mean = jnp.sum(x_on_support, axis=-1, keepdims=True) / size
  mean_sq = jnp.sum(x_on_support**2, axis=-1, keepdims=True) / size
  return size, mean, mean_sq


def _sparsemax_forward(z: jax.Array) -> jax.Array:
  x = _shifted(z)
  tau_hi = -1 / _num_finite(z)  # sum_i [x_i - tau]_+ <= n (-tau) <= 1 there
  tau_lo = _bisect_threshold(
      lambda tau: jnp.maximum(x - tau, 0.0), tau_hi, _support_iters(z.dtype))
  size, mean, _ = _support_moments(x, tau_lo)
  return jnp.maximum(x - (mean - 1 / size), 0.0)


def _entmax15_forward(z: jax.Array) -> jax.Array:
  x = _shifted(z) / 2
  tau_hi = -jnp.sqrt(1 / _num_finite(z))  # sum_i [x_i - tau]_+^2 <= n tau^2 <= 1 there
  tau_lo = _bisect_threshold(
      lambda tau: jnp.maximum(x - tau, 0.0) ** 2, tau_hi, _support_iters(z.dtype))
  size, mean, mean_sq = _support_moments(x, tau_lo)
  tau = mean - jnp.sqrt(jnp.maximum((1 - size * (mean_sq - mean**2)) / size, 0.0))
  return jnp.maximum(x - tau, 0.0) ** 2


def _power(base: jax.Array, exponent: jax.Array) -> jax.Array:
  """base^exponent for base >= 0 and exponent > 0, as exp(exponent log base).

  XLA's CPU pow with a non-constant exponent is ~6x slower than this vectorised exp and log.
  """
  return jnp.exp(exponent * jnp.log(base))


def _bisect_forward(z: jax.Array, alpha: jax.Array, n_iter: int) -> jax.Array:
  x = (alpha - 1) * _shifted(z)  # max_i x_i = 0
  inverse_power = 1 / (alpha - 1)
  probs = lambda tau: _power(jnp.maximum(x - tau, 0.0), inverse_power)
  tau_hi = -_power(_num_finite(z), 1 - alpha)  # sum_i p_i <= n (-tau)^(1/(alpha-1)) <= 1 there
  p = probs(_bisect_threshold(probs, tau_hi, n_iter))  # sum(p) >= 1
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _input_vjp(p_pow: jax.Array, g: jax.Array) -> jax.Array:
  """dp/dz^T g = s g - s <s, g> / sum(s) for s = p^(2 - alpha) on the support, 0 off it."""
  s_dot_g = jnp.sum(p_pow * g, axis=-1, keepdims=True)
  return p_pow * g - p_pow * s_dot_g / jnp.sum(p_pow, axis=-1, keepdims=True)


@jax.custom_vjp
def _sparsemax(z: jax.Array) -> jax.Array:
  return _sparsemax_forward(z)


def _sparsemax_fwd(z):
  p = _sparsemax_forward(z)
  return p, p


def _sparsemax_bwd(p, g):
  return (_input_vjp((p > 0).astype(g.dtype), g),)


_sparsemax.defvjp(_sparsemax_fwd, _sparsemax_bwd)


@jax.custom_vjp
def _entmax15(z: jax.Array) -> jax.Array:
  return _entmax15_forward(z)


def _entmax15_fwd(z):
  p = _entmax15_forward(z)
  return p, p


def _entmax15_bwd(p, g):
  return (_input_vjp(jnp.sqrt(p), g),)


_entmax15.defvjp(_entmax15_fwd, _entmax15_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _entmax_bisect(z: jax.Array, alpha: jax.Array, n_iter: int) -> jax.Array:
  return _bisect_forward(z, alpha, n_iter)


def _entmax_bisect_fwd(z, alpha, n_iter):
  p = _bisect_forward(z, alpha, n_iter)
  return p, (p, alpha)


def _entmax_bisect_bwd(n_iter, residuals, g):
  del n_iter
  p, alpha = residuals
  log_p = jnp.log(jnp.where(p > 0, p, 1.0))
  p_pow = jnp.where(p > 0, jnp.exp((2 - alpha) * log_p), 0.0)
  d_z = _input_vjp(p_pow, g)
  p_skewed = p_pow / jnp.sum(p_pow, axis=-1, keepdims=True)
  p_log_p = p * log_p
  entropy_term = p_log_p - p_skewed * jnp.sum(p_log_p, axis=-1, keepdims=True)
  dp_dalpha = (p - p_skewed) / (alpha - 1) ** 2 - entropy_term / (alpha - 1)
  d_alpha = jnp.sum(g * dp_dalpha, axis=-1, keepdims=True)
  return d_z, _sum_to_shape(d_alpha, alpha.shape)


_entmax_bisect.defvjp(_entmax_bisect_fwd, _entmax_bisect_bwd)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x summed over the dims that broadcasting `shape` to x's shape added or stretched."""
  leading = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(leading)))
  stretched = tuple(i for i, size in enumerate(shape) if size == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=stretched, keepdims=True)
