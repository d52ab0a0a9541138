"""Geometry of a dictionary: pairwise atom cosines, nearest neighbours, spherical k-means.

Cosines are computed a block of rows at a time ([block, N] at once), so an N = 65k dictionary
never forms its N x N cosine matrix.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.sae.analysis._checks import check_int, check_ndim


def unit_rows(x_ND: Any) -> jax.Array:
  """x_n / |x_n| in float32; a zero row stays zero."""
  x_ND = jnp.asarray(x_ND, jnp.float32)
  norms_N1 = jnp.linalg.norm(x_ND, axis=1, keepdims=True)
  return x_ND / jnp.where(norms_N1 > 0, norms_N1, 1.0)


def _row_reductions(W_dec_ND: Any, block: int) -> dict[str, jax.Array]:
  """Per atom n, over m != n: sum cos, sum |cos|, max cos and its argmax (all [N])."""
  check_ndim("W_dec", W_dec_ND, 2, "(N, D)")
  num_atoms = jnp.shape(W_dec_ND)[0]
  if num_atoms < 2:
    raise ValueError(f"W_dec must hold at least 2 atoms, got shape {jnp.shape(W_dec_ND)}")
  check_int("block", block, 1)
  block = min(block, num_atoms)
  return _row_reductions_jit(jnp.asarray(W_dec_ND, jnp.float32), block)


@functools.partial(jax.jit, static_argnames="block")
def _row_reductions_jit(W_dec_ND: jax.Array, block: int) -> dict[str, jax.Array]:
  num_atoms = W_dec_ND.shape[0]
  unit_ND = unit_rows(W_dec_ND)
  num_blocks = -(-num_atoms // block)
  padded_ND = jnp.pad(unit_ND, ((0, num_blocks * block - num_atoms), (0, 0)))

  def reduce_block(start):
    cos_BN = jax.lax.dynamic_slice_in_dim(padded_ND, start, block) @ unit_ND.T
    row_B = start + jnp.arange(block)
    self_BN = row_B[:, None] == jnp.arange(num_atoms)[None, :]
    masked_BN = jnp.where(self_BN, -jnp.inf, cos_BN)
    off_BN = jnp.where(self_BN, 0.0, cos_BN)
    return (jnp.sum(off_BN, axis=1), jnp.sum(jnp.abs(off_BN), axis=1),
            jnp.max(masked_BN, axis=1), jnp.argmax(masked_BN, axis=1))

  outs = jax.lax.map(reduce_block, jnp.arange(num_blocks) * block)
  names = ("sum", "sum_abs", "nn_cos", "nn_idx")
  return {name: out.reshape(-1)[:num_atoms] for name, out in zip(names, outs)}


def nearest_neighbour_cosines(W_dec_ND: Any, *, block: int = 1024) -> tuple[jax.Array, jax.Array]:
  """(nn_idx [N], nn_cos [N]): each atom's most similar other atom, nn_cos_n = max_{m!=n} cos.

  A cosine near 1 flags a duplicated or split feature; the distribution of nn_cos is the usual
  summary of dictionary redundancy.
  Bricken et al. 2023, "Towards Monosemanticity" (feature splitting); Templeton et al. 2024,
  "Scaling Monosemanticity" (nearest-neighbour decoder cosines).
  """
  rows = _row_reductions(W_dec_ND, block)
  return rows["nn_idx"], rows["nn_cos"]


def pairwise_cosine_stats(W_dec_ND: Any, *, block: int = 1024) -> dict[str, jax.Array]:
  """Summary of the cosines between distinct atoms: mean, mean |cos|, max, mean nearest-neighbour.

  Over the N (N - 1) ordered pairs m != n of unit atoms u: mean_cosine = sum cos / (N (N - 1)),
  mean_abs_cosine likewise with |cos|, max_cosine = max cos, mean_nn_cosine = mean_n max_m cos.
  Random atoms in D dims have mean_abs_cosine ~ sqrt(2 / (pi D)); larger values mean a crowded
  dictionary. Elhage et al. 2022, "Toy Models of Superposition" (interference between features).
  """
  rows = _row_reductions(W_dec_ND, block)
  num_pairs = rows["sum"].shape[0] * (rows["sum"].shape[0] - 1)
  return {"mean_cosine": jnp.sum(rows["sum"]) / num_pairs,
          "mean_abs_cosine": jnp.sum(rows["sum_abs"]) / num_pairs,
          "max_cosine": jnp.max(rows["nn_cos"]),
          "mean_nn_cosine": jnp.mean(rows["nn_cos"])}


@jax.jit
def spherical_kmeans_step(W_dec_ND: Any, centroids_CD: Any) -> tuple[jax.Array, jax.Array]:
  """One Lloyd step on the unit sphere: (new centroids [C, D], assignment [N] to the old ones).

  assign_n = argmax_c <u_n, mu_c> for unit atoms u; mu_c' = sum_{n: assign_n = c} u_n / |...|.
  A cluster that receives no atom keeps its centroid.
  Dhillon & Modha 2001, "Concept Decompositions for Large Sparse Text Data using Clustering".
  """
  unit_ND = unit_rows(W_dec_ND)
  centroids_CD = jnp.asarray(centroids_CD, jnp.float32)
  assign_N = jnp.argmax(unit_ND @ centroids_CD.T, axis=1)
  sums_CD = jax.ops.segment_sum(unit_ND, assign_N, num_segments=centroids_CD.shape[0])
  empty_C1 = jnp.linalg.norm(sums_CD, axis=1, keepdims=True) == 0
  return jnp.where(empty_C1, centroids_CD, unit_rows(sums_CD)), assign_N


def _kmeans_plus_plus(unit_ND: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
  """C seed atoms, each drawn with probability proportional to 1 - (its best cosine to the seeds).

  On the unit sphere |u - mu|^2 = 2 (1 - cos), so this is k-means++ seeding.
  Arthur & Vassilvitskii 2007, "k-means++: The Advantages of Careful Seeding".
  """
  keys = jax.random.split(key, num_clusters)
  first = jax.random.randint(keys[0], (), 0, unit_ND.shape[0])
  centroids_CD = jnp.zeros((num_clusters, unit_ND.shape[1])).at[0].set(unit_ND[first])

  def add_seed(c, carry):
    centroids_CD, best_cos_N = carry
    weights_N = jnp.maximum(1.0 - best_cos_N, 0.0) + 1e-12  # duplicates only: draw uniformly
    pick = jax.random.categorical(keys[c], jnp.log(weights_N))
    return (centroids_CD.at[c].set(unit_ND[pick]),
            jnp.maximum(best_cos_N, unit_ND @ unit_ND[pick]))

  centroids_CD, _ = jax.lax.fori_loop(1, num_clusters, add_seed,
                                      (centroids_CD, unit_ND @ unit_ND[first]))
  return centroids_CD


def spherical_kmeans(W_dec_ND: Any, num_clusters: int, *, key: jax.Array,
                     num_iters: int = 20) -> tuple[jax.Array, jax.Array]:
  """Cluster atoms by direction: (unit centroids [C, D], cluster of each atom [N]).

  k-means++ seeding, then `num_iters` steps of `spherical_kmeans_step`, maximising
  sum_n <u_n, mu_{assign_n}>; the returned assignment is to the returned centroids.
  Dhillon & Modha 2001, "Concept Decompositions for Large Sparse Text Data using Clustering";
  Li et al. 2024, "The Geometry of Concepts: Sparse Autoencoder Feature Structure" (clusters of
  SAE atoms).
  """
  check_ndim("W_dec", W_dec_ND, 2, "(N, D)")
  check_int("num_clusters", num_clusters, 1, jnp.shape(W_dec_ND)[0])
  check_int("num_iters", num_iters, 0)
  return _spherical_kmeans(jnp.asarray(W_dec_ND, jnp.float32), num_clusters, key, num_iters)


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters"))
def _spherical_kmeans(W_dec_ND: jax.Array, num_clusters: int, key: jax.Array,
                      num_iters: int) -> tuple[jax.Array, jax.Array]:
  unit_ND = unit_rows(W_dec_ND)
  centroids_CD = jax.lax.fori_loop(
      0, num_iters, lambda _, c: spherical_kmeans_step(unit_ND, c)[0],
      _kmeans_plus_plus(unit_ND, num_clusters, key))
  return centroids_CD, jnp.argmax(unit_ND @ centroids_CD.T, axis=1)
