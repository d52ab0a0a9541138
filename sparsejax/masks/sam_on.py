"""Sharpness-aware minimisation restricted to normalisation-layer parameters (SAM-ON).

  grads = sam_gradient(loss_fn, params, batch, rho=0.05)          # loss_fn(params, batch) -> loss
  tx = sam(optax.adamw(1e-3), rho=0.05)                            # optax form, same gradient
  updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

Only the leaves whose '/'-joined path matches `path_rule` (default: any path containing "norm",
i.e. the RMSNorm / LayerNorm scales and biases) are perturbed; the norm ‖g_S‖ is taken over
those leaves alone. The gradient at the perturbed point is returned for every leaf.
"""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks.mask import map_with_key_paths, path_str

PyTree = Any

NORM_RULE = ".*norm.*"


def _matches(tree: PyTree, path_rule: str) -> PyTree:
  """A tree like `tree` with True on the leaves whose path `re.search`es `path_rule`."""
  return map_with_key_paths(lambda key_path, _: bool(re.search(path_rule, path_str(key_path))),
                            tree)


def sam_perturbation(grads: PyTree, rho: float, path_rule: str = NORM_RULE) -> PyTree:
  """The SAM ascent step restricted to the leaves S matched by `path_rule`.

  ε_i = ρ g_i / ‖g_S‖₂ for i in S (‖g_S‖₂² = Σ_{j∈S} Σ g_j²), ε_i = 0 elsewhere; ε = 0 when
  g_S = 0. Foret et al. (2021), "Sharpness-Aware Minimization for Efficiently Improving
  Generalization"; restricted to normalisation layers as in Mueller et al. (2023),
  "Normalization Layers Are All That Sharpness-Aware Minimization Needs".
  """
  if rho < 0:
    raise ValueError(f"rho must be >= 0, got {rho}")
  matched = _matches(grads, path_rule)
  if not any(jax.tree.leaves(matched)):
    raise ValueError(f"path_rule {path_rule!r} matches no leaf of the gradient tree")
  sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
           for g, hit in zip(jax.tree.leaves(grads), jax.tree.leaves(matched)) if hit)
  scale = rho / jnp.maximum(jnp.sqrt(sq), 1e-12)
  return jax.tree.map(lambda g, hit: (scale * g).astype(g.dtype) if hit else jnp.zeros_like(g),
                      grads, matched)


def sam_gradient(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any,
                 rho: float, path_rule: str = NORM_RULE, grads: PyTree | None = None) -> PyTree:
  """∇L(w + ε) with ε = `sam_perturbation(∇L(w), rho, path_rule)`: SAM on the matched leaves.

  `loss_fn(params, batch)` returns a scalar. Pass `grads` = ∇L(w) when already computed (the
  trainer's first pass) to spend one extra gradient evaluation instead of two.
  Mueller et al. (2023), "Normalization Layers Are All That Sharpness-Aware Minimization Needs".
  """
  grad_fn = jax.grad(loss_fn)
  if grads is None:
    grads = grad_fn(params, batch)
  eps = sam_perturbation(grads, rho, path_rule)
  return grad_fn(jax.tree.map(jnp.add, params, eps), batch)


def sam(tx: optax.GradientTransformation, rho: float,
        path_rule: str = NORM_RULE) -> optax.GradientTransformationExtraArgs:
  """`tx` fed the SAM gradient on the `path_rule` leaves; `update` needs `grad_fn(params) -> grads`.

  update(grads, state, params, grad_fn=...) runs `tx` on grad_fn(params + ε), ε =
  `sam_perturbation(grads, rho, path_rule)` (`grads` = the gradient at params, as usual).
  Wrap the whole optimizer, clipping included: transforms chained before `sam` are bypassed.
  Mueller et al. (2023), "Normalization Layers Are All That Sharpness-Aware Minimization Needs".
  """
  if rho < 0:
    raise ValueError(f"rho must be >= 0, got {rho}")

  def update_fn(grads, state, params=None, *, grad_fn=None, **extra):  # chain passes all extras
    if params is None or grad_fn is None:
      raise ValueError("sam needs params and grad_fn: tx.update(grads, state, params, "
                       "grad_fn=lambda p: jax.grad(loss)(p, batch))")
    eps = sam_perturbation(grads, rho, path_rule)
    return tx.update(grad_fn(jax.tree.map(jnp.add, params, eps)), state, params)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
