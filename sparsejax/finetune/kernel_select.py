"""Kernel-scored sparse fine-tuning: tune only the weights with the largest share of the NTK.

Fine-tuning a pre-trained network stays close to its linearisation f(θ0 + δ) ≈ f(θ0) + J δ, so
its dynamics are those of the empirical neural tangent kernel on the data, Θ = J J^T (Jacot et
al. 2018; Malladi et al. 2023 show language-model fine-tuning behaves this way). Θ is a sum over
parameters, Θ = Σ_p J_:p J_:p^T, and the trace of parameter p's term,

    s_p = tr(J_:p J_:p^T) = Σ_n Σ_c (∂f_c(x_n) / ∂θ_p)^2,

measures how far tuning p alone moves the outputs on the calibration inputs x_1..x_N. Weights
then compete at two levels, as in SNELLA's bi-level parameter competition (Shen et al. 2025):
across layers (param leaves), the budget k = round(density P) is split in proportion to each
layer's kernel mass tr Θ_l = Σ_{p in l} s_p (largest remainders, ties to the earlier layer, no
layer given more than its size); inside a layer, its k_l weights of highest s_p win (ties to the
lower flat index). Only the winners are trained, the rest stay bit-identical
(`sparsejax.masks.wrap.masked`):

  scores = ntk_scores(lambda p, x: model.apply({"params": p}, x)[0], params, batches)
  mask = competition_mask(scores, density=0.01)
  tx = masked(optax.adamw(1e-3), mask)

SNELLA scores weights during training and tunes them through a kernelized low-rank
reparametrisation (one stage); this module is the two-stage variant: the kernel score is
computed once on a few batches before training, then a masked optimizer tunes the winners.

Jacot et al. 2018, "Neural Tangent Kernel"; Malladi et al. 2023, "A Kernel-Based View of
Language Model Fine-Tuning"; Shen et al. 2025, "Kernelized Sparse Fine-Tuning with Bi-level
Parameter Competition for Vision Models".
"""
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def ntk_scores(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
               batches: Sequence[jax.Array]) -> Any:
  """s_p = Σ_batches Σ_n Σ_c (∂f_c(x_n)/∂θ_p)^2 for every param, a float32 tree like `params`.

  `apply_fn(params, x)` returns the outputs (any shape) whose Jacobian defines the kernel, e.g.
  the logits. The Jacobian of one batch is materialised (outputs x params floats), so pass
  small batches.
  """
  if not batches:
    raise ValueError("batches must hold at least one input batch, got none")

  @jax.jit
  def batch_scores(x):
    jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
    out_ndim = jnp.ndim(jax.eval_shape(apply_fn, params, x))
    return jax.tree.map(
        lambda j: jnp.sum(jnp.square(j.astype(jnp.float32)), axis=tuple(range(out_ndim))), jac)

  total = None
  for x in batches:
    s = batch_scores(x)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  return total


def allocate_budget(masses: Sequence[float], sizes: Sequence[int], k: int) -> list[int]:
  """k_l summing to k, proportional to `masses`, each at most its size (largest remainders).

  A layer whose share exceeds its size gets its size and the rest is split again among the
  others; layers of zero total mass share what remains in proportion to their sizes.
  """
  masses = np.asarray(masses, np.float64)
  sizes = np.asarray(sizes, np.int64)
  if masses.shape != sizes.shape or masses.ndim != 1:
    raise ValueError(f"masses {masses.shape} and sizes {sizes.shape} must be equal 1-D shapes")
  if np.any(masses < 0):
    raise ValueError(f"masses must be >= 0, got {masses.tolist()}")
  if not 0 <= k <= sizes.sum():
    raise ValueError(f"k must be in [0, {int(sizes.sum())}] (the total size), got {k}")
  counts = np.zeros_like(sizes)
  open_ = np.ones(sizes.shape, bool)
  left = k
  while left > 0:
    weights = np.where(open_, masses, 0.0)
    if weights.sum() == 0:
      weights = np.where(open_, sizes - counts, 0).astype(np.float64)
    share = left * weights / weights.sum()
    over = open_ & (counts + share >= sizes)
    if over.any():
      left -= int((sizes - counts)[over].sum())
      counts[over] = sizes[over]
      open_ &= ~over
      continue
    floor = np.floor(share).astype(np.int64)
    rest = left - int(floor.sum())
    order = np.argsort(-(share - floor), kind="stable")  # largest remainder, earlier first
    floor[order[:rest]] += 1
    counts += floor
    left = 0
  return counts.tolist()


def competition_mask(scores: Any, density: float) -> Any:
  """A bool tree like `scores`: the bi-level winners of a budget round(density P) (see module).

  Exactly round(density P) entries are True over all P entries of `scores`.
  """
  if isinstance(density, bool) or not 0.0 <= float(density) <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density!r}")
  leaves, treedef = jax.tree.flatten(scores)
  sizes = [int(np.size(s)) for s in leaves]
  masses = [float(jnp.sum(s)) for s in leaves]
  k = int(round(float(density) * sum(sizes)))
  counts = allocate_budget(masses, sizes, k)
  return jax.tree.unflatten(treedef, [_top_k_mask(s, c) for s, c in zip(leaves, counts)])


def _top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """bool like `scores`, True at its k largest entries (ties: lower flat index)."""
  flat = jnp.asarray(scores, jnp.float32).reshape(-1)
  if k == 0:
    return jnp.zeros(jnp.shape(scores), bool)
  idx = lax.top_k(flat, k)[1]
  return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(jnp.shape(scores))
