"""SVCCA: how much two representations of the same tokens share, invariant to linear maps."""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.sae.analysis._checks import check_int, check_ndim, check_same


def top_directions(x_TN: Any, keep: int) -> jax.Array:
  """U_TK: an orthonormal basis of the `keep` top principal directions of the centred data.

  X - mean(X) = U S V^T (thin SVD); the SVD-reduced data U[:, :keep] S[:keep] spans the same
  columns as U[:, :keep], which is all CCA needs.
  """
  x_TN = jnp.asarray(x_TN, jnp.float32)
  centred_TN = x_TN - jnp.mean(x_TN, axis=0)
  u_TR, _, _ = jnp.linalg.svd(centred_TN, full_matrices=False)
  return u_TR[:, :keep]


def svcca(acts_a_TN: Any, acts_b_TM: Any, keep: int) -> tuple[jax.Array, jax.Array]:
  """SVCCA similarity of two activation sets on the same T tokens: (mean rho, rho [keep]).

  Each set is centred and SVD-reduced to its `keep` top directions; CCA then finds the
  correlations rho_1 >= ... >= rho_keep of the best-aligned pairs of linear combinations. For
  centred data with orthonormal bases U_a, U_b of the reduced spaces these are the singular values
  of U_a^T U_b (cosines of the principal angles). Invariant to any invertible linear map of either
  set: a rotated and rescaled copy gives rho = 1, independent noise gives rho ~ sqrt(keep / T).
  `keep` must not exceed the rank of either centred set (directions past the rank are arbitrary).
  Raghu et al. 2017, "SVCCA: Singular Vector Canonical Correlation Analysis for Deep Learning
  Dynamics and Interpretability"; Lan et al. 2024, "Sparse Autoencoders Reveal Universal Feature
  Spaces Across Large Language Models" (SVCCA between SAE feature spaces).
  """
  check_ndim("acts_a", acts_a_TN, 2, "(T, N)")
  check_ndim("acts_b", acts_b_TM, 2, "(T, M)")
  check_same("acts_b's T", jnp.shape(acts_b_TM)[0], jnp.shape(acts_a_TN)[0], "acts_a's T")
  num_tokens, n_a = jnp.shape(acts_a_TN)
  check_int("keep", keep, 1, min(n_a, jnp.shape(acts_b_TM)[1], num_tokens - 1))
  return _svcca(jnp.asarray(acts_a_TN, jnp.float32), jnp.asarray(acts_b_TM, jnp.float32), keep)


@functools.partial(jax.jit, static_argnames="keep")
def _svcca(acts_a_TN: jax.Array, acts_b_TM: jax.Array, keep: int) -> tuple[jax.Array, jax.Array]:
  rho_K = jnp.linalg.svd(top_directions(acts_a_TN, keep).T @ top_directions(acts_b_TM, keep),
                         compute_uv=False)
  rho_K = jnp.clip(rho_K, 0.0, 1.0)
  return jnp.mean(rho_K), rho_K
