"""CoSpaDi: one-shot compression of one layer as a dictionary times a column-sparse code.

For a layer y = x w with w_IO and calibration inputs x_NI (as in `oneshot.py`), find a dictionary
d_IM (M atoms in input space) and a code s_MO with exactly `sparsity` nonzeros per output column,

  min_{d, s} ||x w - x d s||_F^2 = ||R (w - d s)||_F^2,   s.t. ||s_:o||_0 <= sparsity,

where R is the upper Cholesky factor of H = x^T x + lambda I (`oneshot.hessian`, H = R^T R). The
data-aware problem is plain dictionary learning on the whitened target y_a = R w: learn
(d_a, s) with y_a ~= d_a s, then d = R^-1 d_a. Dictionary learning alternates

  sparse coding   s_:o = OMP(d_a, y_a[:, o], sparsity) (orthogonal matching pursuit: greedily add
                  the atom most correlated with the residual, refit the support by least
                  squares); a column keeps its previous code if that one fits better, so the
                  step never increases the error. Pati et al. 1993, "Orthogonal Matching
                  Pursuit".
  dict. update    MOD: d_a = argmin_d ||y_a - d s||_F = y_a s^+ (least squares), then atoms are
                  rescaled to unit norm (their code rows scaled inversely, d s unchanged); an
                  unused atom is replaced by the worst-fitted residual column (this changes
                  nothing in d s). Engan et al. 1999, "Method of Optimal Directions".

so the whitened error ||y_a - d_a s||_F is non-increasing over iterations. Parameters: I M for d
plus O sparsity code values (and as many atom indices), against round(density I O) values (and
the mask) for SparseGPT / Wanda at the same budget (`cospadi_param_count`,
`cospadi_atoms_for_budget`).

Shopkhoev et al. 2025, "CoSpaDi: Compressing LLMs via Calibration-Guided Sparse Dictionary
Learning" (data-aware objective through the calibration Cholesky factor; K-SVD there, MOD here).
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sparsejax.masks import oneshot

_HIGHEST = lax.Precision.HIGHEST


def cospadi_param_count(in_dim: int, out_dim: int, num_atoms: int, sparsity: int) -> int:
  """Stored values of a CoSpaDi layer: I M dictionary entries + O sparsity code values."""
  return in_dim * num_atoms + out_dim * sparsity


def cospadi_atoms_for_budget(in_dim: int, out_dim: int, params: int, sparsity: int) -> int:
  """The largest M with cospadi_param_count(I, O, M, sparsity) <= params (ValueError if < sparsity).

  For SparseGPT's budget at density d, params = round(d I O).
  """
  atoms = (params - out_dim * sparsity) // in_dim
  if atoms < max(sparsity, 1):
    raise ValueError(f"params={params} allows only {atoms} atoms of size {in_dim} next to "
                     f"{out_dim}x{sparsity} code values; need at least sparsity={sparsity}")
  return int(atoms)


@functools.partial(jax.jit, static_argnums=2)
def omp(d_IM: jax.Array, y_IO: jax.Array, sparsity: int) -> jax.Array:
  """s_MO: for each column y_:o, `sparsity` atoms chosen by orthogonal matching pursuit.

  Step t: j_t = argmax_{j not chosen} |<d_:j, r>| / ||d_:j||, then c solves the normal equations
  (G_JJ + eps I) c = (d^T y)_J on the chosen J = {j_1..j_t}, with G = d^T d (computed once, eps =
  1e-7 max diag G against repeated atoms), and r = y - d_:J c. Pati et al. 1993.
  """
  d_IM, y_IO = jnp.asarray(d_IM, jnp.float32), jnp.asarray(y_IO, jnp.float32)
  atoms, outputs = d_IM.shape[1], y_IO.shape[1]
  if not 1 <= sparsity <= atoms or d_IM.shape[0] != y_IO.shape[0]:
    raise ValueError(f"omp needs d [I, M], y [I, O] and sparsity in [1, M]; got d {d_IM.shape}, "
                     f"y {y_IO.shape}, sparsity={sparsity}")
  gram_MM = jnp.dot(d_IM.T, d_IM, precision=_HIGHEST)
  proj_OM = jnp.dot(y_IO.T, d_IM, precision=_HIGHEST)
  inv_norm_M = jax.lax.rsqrt(jnp.maximum(jnp.diag(gram_MM), 1e-30))
  ridge = 1e-7 * jnp.max(jnp.diag(gram_MM))
  rows_O1 = jnp.arange(outputs)[:, None]
  corr_OM, idx_OS = proj_OM, jnp.zeros((outputs, 0), jnp.int32)
  for step in range(sparsity):
    score_OM = jnp.abs(corr_OM) * inv_norm_M
    score_OM = score_OM.at[rows_O1, idx_OS].set(-1.0)
    idx_OS = jnp.concatenate([idx_OS, jnp.argmax(score_OM, axis=1)[:, None].astype(jnp.int32)],
                             axis=1)
    g_OSS = gram_MM[idx_OS[:, :, None], idx_OS[:, None, :]] + ridge * jnp.eye(step + 1)
    coef_OS = jnp.linalg.solve(g_OSS, jnp.take_along_axis(proj_OM, idx_OS, axis=1)[..., None])
    s_OM = jnp.zeros((outputs, atoms), jnp.float32).at[rows_O1, idx_OS].add(coef_OS[..., 0])
    corr_OM = proj_OM - jnp.dot(s_OM, gram_MM, precision=_HIGHEST)  # = (y - d s)^T d
  return s_OM.T


def learn_dictionary(y_IO: jax.Array, num_atoms: int, sparsity: int, iters: int,
                     seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(d_IM, s_MO, err_T): MOD dictionary learning of y ~= d s with `sparsity`-sparse columns of s.

  d starts as `num_atoms` distinct random columns of y, unit-normed (random normal atoms when M >
  O). Each of the `iters` iterations codes s by OMP (keeping a column's previous code when it fits
  better), then updates d by MOD (see the module docstring). err_T[t] = ||y - d s||_F after
  iteration t: non-increasing. Engan et al. 1999; Aharon et al. 2006 (K-SVD's dead-atom
  replacement).
  """
  _check_sizes(np.shape(y_IO), num_atoms, sparsity, iters)
  return _learn(jnp.asarray(y_IO, jnp.float32), num_atoms, sparsity, iters, seed)


def cospadi_compress(w_IO: jax.Array, x_NI: jax.Array, num_atoms: int, sparsity: int,
                     iters: int = 20, dampening: float = 0.01,
                     seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """(d_IM, s_MO) with w ~= d s minimising ||x w - x d s||_F (see the module docstring), float32.

  s has at most `sparsity` nonzeros per output column (exact zeros elsewhere). Shopkhoev et al.
  2025 (CoSpaDi), data-aware variant.
  """
  oneshot._check_layer(w_IO, x_NI)  # pylint: disable=protected-access
  _check_sizes(np.shape(w_IO), num_atoms, sparsity, iters)
  return _compress(jnp.asarray(w_IO, jnp.float32), jnp.asarray(x_NI, jnp.float32), num_atoms,
                   sparsity, iters, dampening, seed)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 6))
def _compress(w_IO, x_NI, num_atoms, sparsity, iters, dampening, seed):
  r_II = jnp.linalg.cholesky(oneshot.hessian(x_NI, dampening)).T  # H = R^T R
  da_IM, s_MO, _ = _learn(jnp.dot(r_II, w_IO, precision=_HIGHEST), num_atoms, sparsity, iters,
                          seed)
  d_IM = jax.scipy.linalg.solve_triangular(r_II, da_IM, lower=False)
  return d_IM, s_MO


def _check_sizes(shape: tuple[int, ...], num_atoms: int, sparsity: int, iters: int) -> None:
  if len(shape) != 2:
    raise ValueError(f"the target must be 2-D [I, O], got shape {shape}")
  if not 1 <= sparsity <= min(num_atoms, shape[0]):
    raise ValueError(f"sparsity={sparsity} must be in [1, min(num_atoms={num_atoms}, "
                     f"I={shape[0]})]")
  if iters < 1:
    raise ValueError(f"iters={iters} must be >= 1")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _learn(y_IO, num_atoms, sparsity, iters, seed):
  d_IM = _init_atoms(y_IO, num_atoms, jax.random.key(seed))
  s_MO = jnp.zeros((num_atoms, y_IO.shape[1]), jnp.float32)

  def step(carry, _):
    d_IM, s_MO = carry
    s_MO = _code_keeping_better(d_IM, y_IO, s_MO, sparsity)
    d_IM, s_MO = _mod_update(y_IO, s_MO)
    err = jnp.linalg.norm(y_IO - jnp.dot(d_IM, s_MO, precision=_HIGHEST))
    return (d_IM, s_MO), err

  (d_IM, s_MO), err_T = lax.scan(step, (d_IM, s_MO), None, length=iters)
  return d_IM, s_MO, err_T


def _init_atoms(y_IO, num_atoms, key):
  """Unit-normed distinct random columns of y (random normal atoms beyond O or for zero columns)."""
  inputs, outputs = y_IO.shape
  key_cols, key_normal = jax.random.split(key)
  picked = jax.random.permutation(key_cols, outputs)[:min(num_atoms, outputs)]
  cols_IM = jnp.concatenate(
      [y_IO[:, picked], jnp.zeros((inputs, num_atoms - picked.shape[0]), y_IO.dtype)], axis=1)
  normal_IM = jax.random.normal(key_normal, (inputs, num_atoms), jnp.float32)
  norm_M = jnp.linalg.norm(cols_IM, axis=0)
  atoms_IM = jnp.where(norm_M > 0, cols_IM, normal_IM)
  return atoms_IM / jnp.linalg.norm(atoms_IM, axis=0)


def _code_keeping_better(d_IM, y_IO, s_old_MO, sparsity):
  s_new_MO = omp(d_IM, y_IO, sparsity)
  err_new_O = _column_errors(d_IM, s_new_MO, y_IO)
  err_old_O = _column_errors(d_IM, s_old_MO, y_IO)
  return jnp.where((err_new_O <= err_old_O)[None, :], s_new_MO, s_old_MO)


def _column_errors(d_IM, s_MO, y_IO):
  return jnp.sum(jnp.square(y_IO - jnp.dot(d_IM, s_MO, precision=_HIGHEST)), axis=0)


def _mod_update(y_IO, s_MO):
  """(d, s): d = y s^+ with unit atoms and s rescaled; unused atoms become worst residuals."""
  d_IM = jnp.dot(y_IO, jnp.linalg.pinv(s_MO), precision=_HIGHEST)
  norm_M = jnp.linalg.norm(d_IM, axis=0)
  used_M = (norm_M > 1e-12) & jnp.any(s_MO != 0, axis=1)
  s_MO = jnp.where(used_M[:, None], s_MO * norm_M[:, None], 0.0)
  d_IM = jnp.where(used_M[None, :], d_IM / jnp.where(used_M, norm_M, 1.0)[None, :], 0.0)
  residual_IO = y_IO - jnp.dot(d_IM, s_MO, precision=_HIGHEST)
  worst_O = jnp.argsort(-jnp.sum(jnp.square(residual_IO), axis=0))
  # The j-th unused atom takes the j-th worst-fitted column (wrapping when atoms outnumber O).
  rank_M = (jnp.cumsum(~used_M) - 1) % y_IO.shape[1]
  spare_IM = residual_IO[:, worst_O[rank_M]]
  spare_norm_M = jnp.linalg.norm(spare_IM, axis=0)
  spare_IM = jnp.where(spare_norm_M > 1e-12, spare_IM / jnp.where(spare_norm_M > 1e-12,
                                                                  spare_norm_M, 1.0), 0.0)
  return jnp.where(used_M[None, :], d_IM, spare_IM), s_MO
