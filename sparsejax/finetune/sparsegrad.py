"""SparseGrad: fine-tune MLP weights through a sparse gradient in a basis fitted to their gradients.

For a layer y = x w with w_IO, stack its gradients on S calibration batches, G_SIO, and take the
factor matrices of the two weight modes of their higher-order SVD (HOSVD, the Tucker factors):

  u_II = left singular vectors of the mode-I unfolding [G_1 ... G_S]        (I x S O)
  v_OO = left singular vectors of the mode-O unfolding [G_1^T ... G_S^T]    (O x S I)

both orthogonal. In that basis a gradient g' = u^T g v concentrates on few entries (about 1 % of
them carry it in the paper's BERT / LLaMa MLPs). Each step keeps the k = round(fraction I O)
entries of largest |g'_io| (ties to the lower flat index), runs the inner optimizer on that
sparse g' (its state lives in the basis, as for the paper's SparseGradLinear layer, whose trained
weight is w' = u^T w v), zeroes the inner update outside the kept entries, and maps it back:
Δw = u Δw' v^T. Leaves without a basis are frozen (update -0.0, so p + u == p bit for bit) or,
with `train_other`, trained densely by the same inner optimizer.

  grads = [jax.grad(loss)(params, batch) for batch in calibration]     # S gradient trees
  bases = fit_bases(grads, ["layer_0/kernel", "layer_1/kernel"])
  tx = sparsegrad_update(optax.adamw(1e-3), bases, fraction=0.01)

Pure pieces: `fit_basis`, `to_basis`, `from_basis`, `top_fraction_mask`, `fit_bases`;
`sparsegrad_update` is the optax transformation.

Chekalina et al. 2024, "SparseGrad: A Selective Method for Efficient Fine-tuning of MLP Layers";
De Lathauwer et al. 2000, "A Multilinear Singular Value Decomposition" (HOSVD).
"""
from typing import Any, Mapping, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.masks.mask import leaf_paths, leaves_by_path

Basis = tuple[jax.Array, jax.Array]


def fit_basis(grads_SIO: jax.Array) -> Basis:
  """(u_II, v_OO): the orthogonal HOSVD factors of the two weight modes of stacked gradients."""
  grads_SIO = jnp.asarray(grads_SIO, jnp.float32)
  if grads_SIO.ndim != 3:
    raise ValueError(f"grads must have shape (S, I, O), got {grads_SIO.shape}")
  steps, inputs, outputs = grads_SIO.shape
  unfold_I = jnp.transpose(grads_SIO, (1, 0, 2)).reshape(inputs, steps * outputs)
  unfold_O = jnp.transpose(grads_SIO, (2, 0, 1)).reshape(outputs, steps * inputs)
  u_II = jnp.linalg.svd(unfold_I, full_matrices=True)[0]
  v_OO = jnp.linalg.svd(unfold_O, full_matrices=True)[0]
  return u_II, v_OO


def to_basis(g_IO: jax.Array, u_II: jax.Array, v_OO: jax.Array) -> jax.Array:
  """g' = u^T g v."""
  hi = lax.Precision.HIGHEST
  return jnp.dot(jnp.dot(u_II.T, g_IO, precision=hi), v_OO, precision=hi)


def from_basis(g_IO: jax.Array, u_II: jax.Array, v_OO: jax.Array) -> jax.Array:
  """g = u g' v^T (the inverse of `to_basis`: u and v are orthogonal)."""
  hi = lax.Precision.HIGHEST
  return jnp.dot(jnp.dot(u_II, g_IO, precision=hi), v_OO.T, precision=hi)


def kept_count(size: int, fraction: float) -> int:
  """k = round(fraction size), at least 1; ValueError unless 0 < fraction <= 1."""
  if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  return max(1, int(round(float(fraction) * size)))


def top_fraction_mask(x: jax.Array, fraction: float) -> jax.Array:
  """bool like x: True at the k = round(fraction x.size) entries of largest |x| (ties: lower
  flat index first)."""
  k = kept_count(x.size, fraction)
  idx = lax.top_k(jnp.abs(x).reshape(-1), k)[1]
  return jnp.zeros((x.size,), bool).at[idx].set(True).reshape(x.shape)


def fit_bases(calibration_grads: Sequence[Any], paths: Sequence[str]) -> dict[str, Basis]:
  """{path: (u, v)} fitted on the S gradient trees `calibration_grads` for each 2-D leaf in
  `paths` ('/'-joined param paths, e.g. "layer_0/kernel"; boxed params see-through)."""
  if not calibration_grads:
    raise ValueError("calibration_grads must hold at least one gradient tree, got none")
  flats = [leaves_by_path(g) for g in calibration_grads]
  bases = {}
  for path in paths:
    if path not in flats[0]:
      raise ValueError(f"path {path!r} is not a param; params: {sorted(flats[0])}")
    if np.ndim(flats[0][path]) != 2:
      raise ValueError(f"param {path!r} must be 2-D (in, out), got shape "
                       f"{np.shape(flats[0][path])}")
    bases[path] = fit_basis(jnp.stack([flat[path] for flat in flats]))
  return bases


class SparseGradState(NamedTuple):
  inner: Any


def sparsegrad_update(inner: optax.GradientTransformation, bases: Mapping[str, Basis],
                      fraction: float, train_other: bool = False
                      ) -> optax.GradientTransformation:
  """`inner` on each based leaf's top-`fraction` gradient entries in its basis, mapped back.

  `bases` maps '/'-joined param paths to (u_II, v_OO) (from `fit_bases`). Other leaves are frozen
  (update -0.0) unless `train_other`, then `inner` updates them densely. The kept count per
  based leaf is exactly round(fraction I O) entries of the basis-space update.
  Chekalina et al. 2024, "SparseGrad".
  """
  kept_count(1, fraction)  # validates

  def specs(tree):
    paths = leaf_paths(tree)
    unknown = sorted(set(bases) - set(paths))
    if unknown:
      raise ValueError(f"bases name {unknown}, which are not params")
    return [tuple(bases[path]) if path in bases else bool(train_other) for path in paths]

  def inner_params(leaves, leaf_specs):
    return [to_basis(x, *s) if isinstance(s, tuple) else (x if s else None)
            for x, s in zip(leaves, leaf_specs)]

  def init_fn(params):
    return SparseGradState(inner.init(inner_params(jax.tree.leaves(params), specs(params))))

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    leaf_specs = specs(updates)
    in_basis = inner_params(leaves, leaf_specs)  # g' = u^T g v, g (trained) or None (frozen)
    kept = [top_fraction_mask(g, fraction) if isinstance(s, tuple) else None
            for g, s in zip(in_basis, leaf_specs)]
    grads = [g if m is None else jnp.where(m, g, 0.0) for g, m in zip(in_basis, kept)]
    in_params = None if params is None else inner_params(jax.tree.leaves(params), leaf_specs)
    inner_updates, inner_state = inner.update(grads, state.inner, in_params)
    out = []
    for g, s, m, u in zip(leaves, leaf_specs, kept, inner_updates):
      if s is False:
        out.append(jnp.full_like(g, -0.0))
      elif m is None:
        out.append(u)
      else:
        out.append(from_basis(jnp.where(m, u, 0.0), *s).astype(g.dtype))
    return jax.tree.unflatten(treedef, out), SparseGradState(inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
