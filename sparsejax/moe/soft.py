"""Soft MoE routing: every slot takes a softmax-weighted mix of a group's tokens (pure functions).

Puigcerver et al., 2024, "From Sparse to Soft Mixtures of Experts". For a group of M tokens
x_MD and slot parameters phi_DS (S = E * slots per expert):
  logits_MS = scale * normalize(x_MD) @ normalize(phi_DS)       (l2 over D, learned scale)
  dispatch_MS = softmax over M (each slot's token mix),   slots_SD = dispatch_MS^T x_MD
  combine_MS  = softmax over S (each token's slot mix),   y_MD = combine_MS expert_out_SD
"""
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-6) -> jax.Array:
  """x / max(||x||_2, eps) along `axis`, with a finite gradient at x = 0."""
  # sqrt after the max: d sqrt(s)/ds is infinite at s = 0 (an all-zero token, e.g. a blank
  # image patch), which made the gradient NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True),
                                       eps * eps))


def soft_weights(x_GMD: jax.Array, phi_DS: jax.Array, scale: jax.Array):
  """Dispatch and combine weights of each token group, both float32 `[G, M, S]`.

  dispatch[g, :, s] sums to 1 over the group's tokens; combine[g, m, :] sums to 1 over slots.
  """
  x_GMD = l2_normalize(x_GMD.astype(jnp.float32), axis=-1)
  phi_DS = l2_normalize(phi_DS.astype(jnp.float32), axis=0)
  logits_GMS = scale.astype(jnp.float32) * jnp.einsum("gmd,ds->gms", x_GMD, phi_DS)
  return jax.nn.softmax(logits_GMS, axis=1), jax.nn.softmax(logits_GMS, axis=2)


def soft_dispatch(x_GMD: jax.Array, dispatch_GMS: jax.Array) -> jax.Array:
  """Slot inputs slots[g, s] = sum_m dispatch[g, m, s] x[g, m]: `[G, S, D]`."""
  return jnp.einsum("gms,gmd->gsd", dispatch_GMS.astype(x_GMD.dtype), x_GMD)


def soft_combine(out_GSD: jax.Array, combine_GMS: jax.Array) -> jax.Array:
  """Token outputs y[g, m] = sum_s combine[g, m, s] out[g, s]: `[G, M, D]`."""
  return jnp.einsum("gms,gsd->gmd", combine_GMS.astype(out_GSD.dtype), out_GSD)
