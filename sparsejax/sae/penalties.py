"""SAE penalty terms and the dictionary-geometry rule for k.

Every penalty here is unweighted; `core.sae_apply` multiplies by the config's coefficients.
"""
import math

import jax
import jax.numpy as jnp

from sparsejax.sae import metrics
from sparsejax.sae.initializers import unit_rows


def decoder_norm_l1(acts_TN: jax.Array, w_dec_ND: jax.Array) -> jax.Array:
  """mean_t sum_n |a_tn| ||W_dec[n]||, the L1 penalty that a rescaled decoder cannot dodge.

  Bricken et al. 2023, "Towards Monosemanticity"; Anthropic, "Circuits Updates - April 2024"
  (the decoder-norm-weighted L1).
  """
  return jnp.mean(jnp.abs(acts_TN) @ jnp.linalg.norm(w_dec_ND, axis=-1))


def orthogonality_penalty(w_dec_ND: jax.Array, num_chunks: int = 1, *,
                          key: jax.Array | None = None) -> jax.Array:
  """OrtSAE's penalty: the mean over atoms of the largest squared cosine to another atom of
  its chunk.

  The N atoms are split into K = `num_chunks` chunks C_k of N / K (a random partition drawn
  from `key`, contiguous index ranges without one) and
    L_orth = (1 / K) sum_k (1 / |C_k|) sum_{i in C_k} max_{j in C_k, j != i} cos(W_i, W_j)^2,
  at cost N^2 / K instead of N^2.
  Korznikov et al. 2025, "OrtSAE: Orthogonal Sparse Autoencoders Uncover Atomic Features".
  """
  num_latents, width = w_dec_ND.shape
  if num_chunks < 1 or num_latents % num_chunks or num_latents // num_chunks < 2:
    raise ValueError(f"num_chunks={num_chunks} must divide num_latents={num_latents} into "
                     f"chunks of at least 2 atoms")
  unit_ND = unit_rows(w_dec_ND)
  if key is not None:
    unit_ND = unit_ND[jax.random.permutation(key, num_latents)]
  chunk_size = num_latents // num_chunks
  unit_KCD = unit_ND.reshape(num_chunks, chunk_size, width)
  cos_KCC = jnp.einsum("kcd,ked->kce", unit_KCD, unit_KCD)
  off_diagonal_KCC = jnp.where(jnp.eye(chunk_size, dtype=bool), 0.0, cos_KCC**2)
  return jnp.mean(jnp.max(off_diagonal_KCC, axis=-1))


def auxk_loss(residual_TD: jax.Array, dead_recon_TD: jax.Array) -> jax.Array:
  """||e - e_hat||^2 / ||e - mean_T e||^2: how well the dead latents' reconstruction e_hat
  explains the main reconstruction's residual e (held fixed).

  Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (AuxK).
  """
  return metrics.fvu(dead_recon_TD, jax.lax.stop_gradient(residual_TD))


def welch_coherence(d_in: int, num_latents: int) -> float:
  """sqrt((N - d) / (d (N - 1))): the smallest possible largest |cos| among N unit vectors in
  R^d (0 when N <= d: an orthonormal set exists).

  Welch 1974, "Lower bounds on the maximum cross correlation of signals".
  """
  if num_latents <= d_in:
    return 0.0
  return math.sqrt((num_latents - d_in) / (d_in * (num_latents - 1)))


def quasi_orthogonal_k(d_in: int, num_latents: int, *, coherence: float | None = None) -> int:
  """The largest k for which every k-sparse code over the dictionary is the unique sparsest
  one: k < (1 + 1 / mu) / 2.

  mu is the dictionary's mutual coherence max_{i != j} |cos(W_i, W_j)|: `coherence` when
  measured on a trained decoder, else the Welch bound, the most quasi-orthogonal any N atoms in
  R^{d_in} can be (then the result is the best case for that size). Capped at num_latents.
  Donoho & Elad 2003, "Optimally sparse representation in general (nonorthogonal) dictionaries
  via l1 minimization"; Welch 1974.
  """
  if d_in < 1 or num_latents < 1:
    raise ValueError(f"d_in={d_in} and num_latents={num_latents} must be positive")
  mu = welch_coherence(d_in, num_latents) if coherence is None else coherence
  if not 0 <= mu <= 1:
    raise ValueError(f"coherence={coherence} must be in [0, 1]")
  if mu == 0:
    return num_latents
  return max(1, min(num_latents, math.ceil((1 + 1 / mu) / 2) - 1))
