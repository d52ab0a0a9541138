"""Sparsity-inducing penalties: group lasso over structured groups, and HyperSparse (ART).

Penalties are pure functions of weights; the regularisation-based updaters add their gradients
(closed forms `*_grad`, equal to `jax.grad` of the penalty) to the task gradient before pruning.
Groups follow the kernel axis convention of `sparsejax.masks.mask` (last axis outputs,
second-to-last inputs, leading axes batch).
"""
import jax
import jax.numpy as jnp

GROUPS = ("channel", "block")

# tanh(HS_TANH_AT) ~= 0.577: the HyperSparse scale s puts the pruning-threshold weight there.
HS_TANH_AT = 0.6585


def _pair(block) -> tuple[int, int]:
  if isinstance(block, int):
    return block, block
  if block is None or len(block) != 2:
    raise ValueError(f"block must be an int b or a pair (b0, b1), got {block!r}")
  return int(block[0]), int(block[1])


def block_sums(x: jax.Array, block) -> jax.Array:
  """Sum of x_...IO over b0 x b1 tiles of its last two axes -> (..., I/b0, O/b1)."""
  b0, b1 = _pair(block)
  if x.ndim < 2 or x.shape[-2] % b0 or x.shape[-1] % b1:
    raise ValueError(f"block {(b0, b1)} must divide the last two axes of shape {x.shape}")
  lead, (i, o) = x.shape[:-2], x.shape[-2:]
  return x.reshape(*lead, i // b0, b0, o // b1, b1).sum(axis=(-3, -1))


def _group_sq_sums(w: jax.Array, group: str, block, axis: int) -> jax.Array:
  """Σ w² per group, broadcast back to w's shape, and the group size |g|."""
  sq = jnp.square(w.astype(jnp.float32))
  if group == "channel":
    axis = axis % w.ndim
    others = tuple(a for a in range(w.ndim) if a != axis)
    return jnp.sum(sq, axis=others, keepdims=True) * jnp.ones_like(sq), sq.size // w.shape[axis]
  if group == "block":
    b0, b1 = _pair(block)
    sums = block_sums(sq, (b0, b1))
    return jnp.repeat(jnp.repeat(sums, b0, axis=-2), b1, axis=-1), b0 * b1
  raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def group_lasso_penalty(w: jax.Array, group: str, block=None, axis: int = -1) -> jax.Array:
  """Σ_g sqrt(|g|) ‖w_g‖₂ over channels (all entries sharing an index on `axis`) or b0 x b1 tiles.

  Yuan & Lin (2006), group lasso; applied to filters/channels by Wen et al. (2016), SSL.
  """
  sq = jnp.square(w.astype(jnp.float32))
  if group == "channel":
    axis = axis % w.ndim
    sums = jnp.sum(sq, axis=tuple(a for a in range(w.ndim) if a != axis))
    size = sq.size // w.shape[axis]
  elif group == "block":
    sums, size = block_sums(sq, block), _pair(block)[0] * _pair(block)[1]
  else:
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
  return jnp.sqrt(float(size)) * jnp.sum(jnp.sqrt(sums))


def group_lasso_grad(w: jax.Array, group: str, block=None, axis: int = -1) -> jax.Array:
  """∂/∂w of `group_lasso_penalty`: sqrt(|g|) w / ‖w_g‖₂ (0 for an all-zero group)."""
  w = jnp.asarray(w)
  sq_full, size = _group_sq_sums(w, group, block, axis)
  norms = jnp.sqrt(sq_full)
  safe = jnp.where(norms > 0, norms, 1.0)
  grad = jnp.where(norms > 0, jnp.sqrt(float(size)) * w.astype(jnp.float32) / safe, 0.0)
  return grad.astype(w.dtype)


def hypersparse_scale(abs_w_N: jax.Array, sparsity: float) -> jax.Array:
  """s = 0.6585 / |w|_(κ): the κ-quantile magnitude (κ = sparsity) lands at tanh(0.6585) ≈ 0.577."""
  sorted_N = jnp.sort(abs_w_N)
  idx = min(int(sparsity * abs_w_N.shape[0]), abs_w_N.shape[0] - 1)
  return HS_TANH_AT / jnp.maximum(sorted_N[idx], 1e-12)


def hypersparse_penalty(w_N: jax.Array, sparsity: float) -> jax.Array:
  """HyperSparse loss over the flat weights w_N, valued 0 but with the adaptive gradient below.

  L_HS = Σ_i |w_i| · T / sg(T) − Σ_i |w_i| with T = Σ_j tanh(s |w_j|), s = `hypersparse_scale`
  (stop-gradient), so ∂L_HS/∂w_i = sign(w_i) · s · sech²(s |w_i|) · Σ_j |w_j| / T: about L1 for
  small weights and vanishing for the top (1 − κ) weights, which are left to the task loss.

  Glandorf, Kaiser & Rosenhahn (2023), "HyperSparse Neural Networks" (ART).
  """
  w_N = w_N.astype(jnp.float32)
  abs_N = jnp.abs(w_N)
  s = jax.lax.stop_gradient(hypersparse_scale(abs_N, sparsity))
  tanh_sum = jnp.sum(jnp.tanh(s * abs_N))
  return jnp.sum(abs_N) * tanh_sum / jax.lax.stop_gradient(tanh_sum) - jnp.sum(abs_N)


def hypersparse_grad(w_N: jax.Array, sparsity: float) -> jax.Array:
  """Closed form of ∂L_HS/∂w_N (see `hypersparse_penalty`)."""
  w_N = w_N.astype(jnp.float32)
  abs_N = jnp.abs(w_N)
  s = hypersparse_scale(abs_N, sparsity)
  sech2_N = 1.0 - jnp.tanh(s * abs_N) ** 2
  return jnp.sign(w_N) * s * sech2_N * jnp.sum(abs_N) / jnp.sum(jnp.tanh(s * abs_N))
