"""Evaluation metrics of sparse autoencoders and transcoders, as pure jnp functions.

  l0                             mean number of active latents per token
  fvu / explained_variance       reconstruction error relative to the variance of the target
  cosine_similarity              mean per-token cosine between reconstruction and target
  relative_reconstruction_bias   gamma = argmin_g E||x_hat / g - x||^2 (shrinkage when < 1)
  ce_loss_recovered / kl_recovered
                                 how much of the LM's loss the spliced-in SAE recovers
  kl_divergence                  per-token KL(p || q) between two next-token distributions
  dead_fraction / dense_fraction from the latent state {"tokens_since_fired", "fire_count",
                                 "tokens"} that `sparsejax.sae.core` keeps
  feature_density_histogram      latents per log10 firing-density bucket, never-fired apart

Every function is jit-safe; the shape checks run at trace time.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Gao et al. 2024: a latent is dead when it has not fired in the last 10 million tokens.
DEAD_AFTER_TOKENS = 10_000_000
# Rajamanoharan et al. 2024 (JumpReLU): latents firing on more than 10 % of tokens are "dense".
DENSE_ABOVE = 0.1


def l0(acts_TN: jax.Array) -> jax.Array:
  """Mean number of nonzero latents per token: (1/T) sum_t #{n : acts[t, n] != 0}."""
  _check_rank("acts_TN", acts_TN, 2)
  return jnp.mean(jnp.sum(acts_TN != 0, axis=-1).astype(jnp.float32))


def fvu(x_hat_TD: jax.Array, x_TD: jax.Array) -> jax.Array:
  """Fraction of variance unexplained: sum_td (x - x_hat)^2 / sum_td (x - mean_t x)^2.

  Predicting the per-dimension mean of x gives 1, a perfect reconstruction 0. Gao et al. 2024,
  "Scaling and evaluating sparse autoencoders" (normalised MSE).
  """
  _check_same_shape("x_hat_TD", x_hat_TD, "x_TD", x_TD)
  x_TD = x_TD.astype(jnp.float32)
  error = jnp.sum(jnp.square(x_TD - x_hat_TD.astype(jnp.float32)))
  variance = jnp.sum(jnp.square(x_TD - jnp.mean(x_TD, axis=0)))
  return error / jnp.maximum(variance, jnp.finfo(variance.dtype).tiny)


def explained_variance(x_hat_TD: jax.Array, x_TD: jax.Array) -> jax.Array:
  """1 - fvu(x_hat, x): 0 for predicting the mean, 1 for a perfect reconstruction."""
  return 1.0 - fvu(x_hat_TD, x_TD)


def cosine_similarity(x_hat_TD: jax.Array, x_TD: jax.Array, *, eps: float = 1e-8) -> jax.Array:
  """Mean per-token cosine: (1/T) sum_t <x_hat_t, x_t> / (max(|x_hat_t|, eps) max(|x_t|, eps)).

  A zero token (or zero reconstruction) counts as cosine 0.
  """
  _check_same_shape("x_hat_TD", x_hat_TD, "x_TD", x_TD)
  x_hat_TD, x_TD = x_hat_TD.astype(jnp.float32), x_TD.astype(jnp.float32)
  dot_T = jnp.sum(x_hat_TD * x_TD, axis=-1)
  norms_T = (jnp.maximum(jnp.linalg.norm(x_hat_TD, axis=-1), eps)
             * jnp.maximum(jnp.linalg.norm(x_TD, axis=-1), eps))
  return jnp.mean(dot_T / norms_T)


def relative_reconstruction_bias(x_hat_TD: jax.Array, x_TD: jax.Array) -> jax.Array:
  """gamma = argmin_g E_t ||x_hat_t / g - x_t||^2 = E_t ||x_hat_t||^2 / E_t <x_hat_t, x_t>.

  With u = 1/g the objective u^2 E||x_hat||^2 - 2 u E<x_hat, x> + E||x||^2 is minimised at
  u = E<x_hat, x> / E||x_hat||^2. gamma < 1 means the SAE shrinks its reconstructions (the L1
  penalty's bias), gamma = 1 means unbiased, and x_hat = c x gives gamma = c.
  Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders".
  """
  _check_same_shape("x_hat_TD", x_hat_TD, "x_TD", x_TD)
  x_hat_TD, x_TD = x_hat_TD.astype(jnp.float32), x_TD.astype(jnp.float32)
  return jnp.sum(jnp.square(x_hat_TD)) / jnp.sum(x_hat_TD * x_TD)


def ce_loss_recovered(clean: jax.Array, spliced: jax.Array, ablated: jax.Array) -> jax.Array:
  """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 when splicing in the SAE costs
  nothing, 0 when it is as bad as ablating the site (zero ablation). Undefined (inf or nan)
  when ablating costs nothing. Rajamanoharan et al. 2024, "Improving Dictionary Learning with
  Gated Sparse Autoencoders" (loss recovered).
  """
  return (ablated - spliced) / (ablated - clean)


def kl_recovered(kl_spliced: jax.Array, kl_ablated: jax.Array) -> jax.Array:
  """(KL_ablated - KL_spliced) / KL_ablated: ce_loss_recovered with the KL from the clean
  next-token distribution in place of CE (the clean model has KL 0 to itself). Gao et al. 2024,
  "Scaling and evaluating sparse autoencoders" (downstream KL).
  """
  return ce_loss_recovered(jnp.zeros_like(kl_ablated), kl_spliced, kl_ablated)


def kl_divergence(logits_p_TV: jax.Array, logits_q_TV: jax.Array) -> jax.Array:
  """Mean per-token KL(p || q) = (1/T) sum_t sum_v p_tv (log p_tv - log q_tv), p = softmax
  of logits_p (the clean model), q = softmax of logits_q (the model with the SAE spliced in)."""
  _check_same_shape("logits_p_TV", logits_p_TV, "logits_q_TV", logits_q_TV)
  log_p_TV = jax.nn.log_softmax(logits_p_TV.astype(jnp.float32), axis=-1)
  log_q_TV = jax.nn.log_softmax(logits_q_TV.astype(jnp.float32), axis=-1)
  # p log p is 0 where p underflows to 0; writing it as p (log p - log q) keeps that exact.
  kl_T = jnp.sum(jnp.where(log_p_TV > -jnp.inf, jnp.exp(log_p_TV) * (log_p_TV - log_q_TV), 0.0),
                 axis=-1)
  return jnp.mean(kl_T)


def dead_fraction(state: dict[str, Any], *,
                  dead_after_tokens: float = DEAD_AFTER_TOKENS) -> jax.Array:
  """Fraction of latents that have not fired in the last `dead_after_tokens` tokens:
  mean_n [tokens_since_fired[n] >= dead_after_tokens]. Gao et al. 2024 (10 M tokens).
  """
  if dead_after_tokens <= 0:
    raise ValueError(f"dead_after_tokens must be > 0, got {dead_after_tokens}")
  since_fired_N = _state_entry(state, "tokens_since_fired")
  return jnp.mean((since_fired_N >= dead_after_tokens).astype(jnp.float32))


def dense_fraction(state: dict[str, Any], *, dense_above: float = DENSE_ABOVE) -> jax.Array:
  """Fraction of latents firing on more than `dense_above` of the tokens seen:
  mean_n [fire_count[n] / tokens > dense_above] (0 before any token). Rajamanoharan et al.
  2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders".
  """
  if not 0 <= dense_above < 1:
    raise ValueError(f"dense_above must lie in [0, 1), got {dense_above}")
  density_N = firing_density(_state_entry(state, "fire_count"), _state_entry(state, "tokens"))
  return jnp.mean((density_N > dense_above).astype(jnp.float32))


def firing_density(fire_count_N: jax.Array, tokens: jax.Array) -> jax.Array:
  """fire_count[n] / tokens: the fraction of tokens on which latent n fired (0 before any)."""
  return fire_count_N.astype(jnp.float32) / jnp.maximum(jnp.asarray(tokens, jnp.float32), 1.0)


def feature_density_histogram(fire_count_N: jax.Array, tokens: jax.Array,
                              bins: Sequence[float] | np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(never_fired, counts_B): latents that never fired, and a histogram of log10(density) of
  the others over the B = len(bins) - 1 buckets [bins[b], bins[b+1]) (the last one closed).

  density = fire_count / tokens; a density below bins[0] counts in the first bucket and one
  above bins[-1] in the last, so never_fired + sum(counts) = N. SAELens's feature density
  histogram (log10 feature density, with never-fired latents apart).
  """
  edges = np.asarray(bins, np.float32)
  if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
    raise ValueError(f"bins must be at least 2 strictly increasing log10-density edges, "
                     f"got {bins!r}")
  _check_rank("fire_count_N", fire_count_N, 1)
  fired_N = fire_count_N > 0
  log_density_N = jnp.log10(jnp.where(fired_N, firing_density(fire_count_N, tokens), 1.0))
  num_buckets = edges.size - 1
  bucket_N = jnp.clip(jnp.searchsorted(jnp.asarray(edges), log_density_N, side="right") - 1,
                      0, num_buckets - 1)
  counts_B = jnp.sum(jax.nn.one_hot(bucket_N, num_buckets, dtype=jnp.int32)
                     * fired_N[:, None].astype(jnp.int32), axis=0)
  return jnp.sum(~fired_N).astype(jnp.int32), counts_B


def _state_entry(state: dict[str, Any], name: str) -> jax.Array:
  if name not in state:
    raise ValueError(f"state must hold {name!r} (the latent state of sparsejax.sae.core), "
                     f"got keys {sorted(state)}")
  return jnp.asarray(state[name])


def _check_rank(name: str, x: jax.Array, rank: int) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if jnp.shape(a) != jnp.shape(b) or jnp.ndim(a) != 2:
    raise ValueError(f"{name_a} and {name_b} must be 2-D of the same shape, got "
                     f"{jnp.shape(a)} and {jnp.shape(b)}")
