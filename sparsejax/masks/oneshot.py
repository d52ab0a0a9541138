"""One-shot pruning of one layer from calibration activations: Wanda and SparseGPT.

For a layer y = x w with w_IO and calibration inputs x_NI (N samples, e.g. batch x tokens):

  wanda      score s_io = |w_io| ||x_:i||_2, compared per output o: each output keeps its
             round(density I) best inputs (`fan_in`), or the best n of every m (`nm`). No weight
             update. Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
             Models" (Wanda).
  sparsegpt  H = x^T x + lambda I (lambda = dampening mean(diag(x^T x))), U = chol(H^-1)^T upper
             triangular. Inputs i are visited in order, in blocks of `blocksize`; on entering a
             block the pruned set is chosen from s_io = w_io^2 / U_ii^2 (unstructured: the lowest
             scores of the whole block, the per-block counts summing exactly to the leaf's;
             N:M: the m - n lowest of each group of m inputs of an output, chosen when the
             group starts); then for each input i, err_o = (w_io - q_io) / U_ii with q the
             pruned row (0 where pruned, w otherwise) and the not-yet-visited weights of the
             block take the OBS update w_jo -= err_o U_ij (j > i); after the block the later
             blocks take the accumulated update W_later -= U_block,later^T Err. This is the
             optimal-brain-surgeon update restricted to the unvisited inputs,
             w_F -= (w_i / [H_F^-1]_ii) [H_F^-1]_{i,F}, computed for all outputs at once.
             Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
             Pruned in One-Shot", Algorithm 1.

Both return (pruned w_IO with exact zeros outside the mask, mask_IO), float32.
"""
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sparsejax.masks import structures


def wanda_scores(w_IO: jax.Array, x_NI: jax.Array) -> jax.Array:
  """s_io = |w_io| ||x_:i||_2."""
  norm_I = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(x_NI, jnp.float32)), axis=0))
  return jnp.abs(jnp.asarray(w_IO, jnp.float32)) * norm_I[:, None]


def wanda_prune(w_IO: jax.Array, x_NI: jax.Array, density: float | None = None,
                n: int | None = None, m: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(w masked, mask) keeping per output the best Wanda scores (fan_in), or n of m (nm)."""
  _check_layer(w_IO, x_NI)
  scores_IO = wanda_scores(w_IO, x_NI)
  if n is not None or m is not None:
    mask_IO = structures.select("nm", scores_IO, density, n=n, m=m)
  else:
    mask_IO = structures.select("fan_in", scores_IO, density)
  return jnp.where(mask_IO, jnp.asarray(w_IO, jnp.float32), 0.0), mask_IO


def hessian(x_NI: jax.Array, dampening: float = 0.01) -> jax.Array:
  """H_II = x^T x + dampening mean(diag(x^T x)) I (float32)."""
  x_NI = jnp.asarray(x_NI, jnp.float32)
  h_II = jnp.dot(x_NI.T, x_NI, precision=lax.Precision.HIGHEST)
  damp = dampening * jnp.mean(jnp.diag(h_II))
  # A dead input (all-zero column) gets a unit diagonal so H stays invertible.
  diag_I = jnp.diag(h_II)
  h_II = h_II + jnp.diag(jnp.where(diag_I == 0, 1.0, 0.0))
  return h_II + damp * jnp.eye(h_II.shape[0], dtype=h_II.dtype)


def sparsegpt_prune(w_IO: jax.Array, x_NI: jax.Array, density: float | None = None,
                    n: int | None = None, m: int | None = None, blocksize: int = 128,
                    dampening: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """(w pruned with the OBS update, mask): SparseGPT on one layer (see the module docstring).

  Unstructured keeps exactly round(density I O) entries; N:M (n, m given) keeps n of every m
  consecutive inputs per output. `blocksize` must be a multiple of m for N:M.
  """
  _check_layer(w_IO, x_NI)
  inputs, outputs = np.shape(w_IO)
  nm = n is not None or m is not None
  if nm:
    structures.structure_count("nm", (inputs, outputs), density, n=n, m=m)  # validates
    if blocksize % m:
      raise ValueError(f"blocksize {blocksize} must be a multiple of M={m} for N:M")
  else:
    structures.structure_count("unstructured", (inputs, outputs), density)  # validates
  if blocksize < 1:
    raise ValueError(f"blocksize must be >= 1, got {blocksize}")
  prune_counts = None if nm else tuple(_block_prune_counts(inputs, outputs, density, blocksize))
  return _sparsegpt(jnp.asarray(w_IO, jnp.float32), jnp.asarray(x_NI, jnp.float32), dampening,
                    blocksize, prune_counts, n, m)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _sparsegpt(w_IO, x_NI, dampening, blocksize, prune_counts, n, m):
  """(w pruned, mask) in one compiled function."""
  upper_II = _inverse_cholesky_upper(hessian(x_NI, dampening))
  w_OI, pruned_OI = _sparsegpt_blocks(w_IO.T, upper_II, blocksize, prune_counts, n, m)
  mask_IO = ~pruned_OI.T
  return jnp.where(mask_IO, w_OI.T, 0.0), mask_IO


def _check_layer(w_IO: Any, x_NI: Any) -> None:
  if np.ndim(w_IO) != 2 or np.ndim(x_NI) != 2 or np.shape(x_NI)[1] != np.shape(w_IO)[0]:
    raise ValueError(f"need w [I, O] and calibration inputs x [N, I]; got w {np.shape(w_IO)} "
                     f"and x {np.shape(x_NI)}")


def _inverse_cholesky_upper(h_II: jax.Array) -> jax.Array:
  """U upper triangular with U^T U = H^-1 (chol of H^-1, transposed)."""
  h_inv_II = jnp.linalg.inv(h_II)
  h_inv_II = (h_inv_II + h_inv_II.T) / 2
  return jnp.linalg.cholesky(h_inv_II).T


def _block_prune_counts(inputs: int, outputs: int, density: float, blocksize: int) -> list[int]:
  """Entries pruned per input block: round(s cum_end) - round(s cum_start), s = 1 - kept/size."""
  size = inputs * outputs
  pruned_total = size - structures.structure_count("unstructured", (inputs, outputs), density)
  counts, prev = [], 0
  for end in range(blocksize, inputs + blocksize, blocksize):
    cum = int(round(pruned_total * min(end, inputs) * outputs / size))
    counts.append(cum - prev)
    prev = cum
  return counts


def _sparsegpt_blocks(w_OI, upper_II, blocksize, prune_counts, n, m):
  """The block loop of SparseGPT; returns (updated w_OI, pruned_OI)."""
  inputs = w_OI.shape[1]
  pruned_OI = jnp.zeros(w_OI.shape, jnp.bool_)
  for block, start in enumerate(range(0, inputs, blocksize)):
    end = min(start + blocksize, inputs)
    u_bb = upper_II[start:end, start:end]
    w_Ob = w_OI[:, start:end]
    if prune_counts is not None:
      scores_Ob = jnp.square(w_Ob) / jnp.square(jnp.diag(u_bb))[None, :]
      keep = scores_Ob.size - prune_counts[block]
      pruned_Ob = ~structures.keep_top_k(scores_Ob.reshape(-1), keep).reshape(scores_Ob.shape)
    else:
      pruned_Ob = jnp.zeros(w_Ob.shape, jnp.bool_)
    q_Ob, err_Ob, pruned_Ob = _sparsegpt_columns(w_Ob, u_bb, pruned_Ob, n, m)
    w_OI = w_OI.at[:, start:end].set(q_Ob)
    pruned_OI = pruned_OI.at[:, start:end].set(pruned_Ob)
    if end < inputs:
      w_OI = w_OI.at[:, end:].add(-jnp.dot(err_Ob, upper_II[start:end, end:],
                                           precision=lax.Precision.HIGHEST))
  return w_OI, pruned_OI


def _sparsegpt_columns(w_Ob, u_bb, pruned_Ob, n, m):
  """Inputs of one block in order: (choose N:M groups), prune, OBS-update the rest of the block."""
  width = w_Ob.shape[1]
  diag_b = jnp.diag(u_bb)

  def column(i, carry):
    w_Ob, q_Ob, err_Ob, pruned_Ob = carry
    if n is not None:
      pruned_Ob = lax.cond(i % m == 0, lambda p: _choose_nm(w_Ob, diag_b, p, i, n, m),
                           lambda p: p, pruned_Ob)
    w_O = w_Ob[:, i]
    q_O = jnp.where(pruned_Ob[:, i], 0.0, w_O)
    err_O = (w_O - q_O) / diag_b[i]
    w_Ob = w_Ob - err_O[:, None] * u_bb[i][None, :]  # u_bb[i, j] = 0 for j < i
    return w_Ob, q_Ob.at[:, i].set(q_O), err_Ob.at[:, i].set(err_O), pruned_Ob

  zeros = jnp.zeros_like(w_Ob)
  _, q_Ob, err_Ob, pruned_Ob = lax.fori_loop(0, width, column, (w_Ob, zeros, zeros, pruned_Ob))
  return q_Ob, err_Ob, pruned_Ob


def _choose_nm(w_Ob, diag_b, pruned_Ob, i, n, m):
  """Mark the m - n lowest w^2 / U_jj^2 of inputs [i, i + m) of every output as pruned."""
  w_Om = lax.dynamic_slice_in_dim(w_Ob, i, m, axis=1)
  d_m = lax.dynamic_slice_in_dim(diag_b, i, m)
  keep_Om = structures.keep_top_k(jnp.square(w_Om) / jnp.square(d_m)[None, :], n)
  return lax.dynamic_update_slice_in_dim(pruned_Ob, ~keep_Om, i, axis=1)
