"""Initial-mask scores: random, magnitude, saliency (SNIP), Fisher (FISH).

A mask init maps params to a score tree of the same structure; `make_mask` keeps the highest
scores of each leaf subject to its structure and density. Registered in `MASK_INITS`:

  random      s ~ U(0, 1), independent per entry (needs `key`). Mocanu et al. 2018 (SET) /
              Evci et al. 2020 (RigL) start from a random mask.
  magnitude   s = |w|. Han et al. 2015, "Learning both Weights and Connections".
  saliency    s = |w g| with g = dL/dw on a batch (`grads`). Lee et al. 2019, "SNIP".
  fisher      s = sum_b g_b^2, accumulated squared gradients (`sq_grads`, see
              `accumulate_sq_grads`): the diagonal empirical Fisher. Sung et al. 2021, "Training
              Neural Networks with Fixed Sparse Masks" (FISH) keep the global top-k
              (`make_mask(..., distribution="global", init="fisher")`) as the update mask.
"""
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from sparsejax.masks.mask import leaf_paths
from sparsejax.registry import MASK_INITS

PyTree = Any


@MASK_INITS.register("random")
def random_scores(params: PyTree, key: jax.Array | None = None) -> PyTree:
  """s ~ U(0, 1) per entry, a different stream per leaf (key folded with the leaf index)."""
  if key is None:
    raise ValueError("mask init 'random' needs key=jax.random.key(seed)")
  leaves, treedef = jax.tree.flatten(params)
  scores = [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(p))
            for i, p in enumerate(leaves)]
  return jax.tree.unflatten(treedef, scores)


@MASK_INITS.register("magnitude")
def magnitude_scores(params: PyTree, key: jax.Array | None = None) -> PyTree:
  """s = |w|."""
  del key
  return jax.tree.map(lambda w: jnp.abs(jnp.asarray(w, jnp.float32)), params)


@MASK_INITS.register("saliency")
def saliency_scores(params: PyTree, key: jax.Array | None = None, grads: PyTree = None) -> PyTree:
  """s = |w g|, the first-order change of the loss when w is removed (SNIP)."""
  del key
  _require_tree("saliency", "grads", params, grads)
  return jax.tree.map(lambda w, g: jnp.abs(jnp.asarray(w, jnp.float32) * g), params, grads)


@MASK_INITS.register("fisher")
def fisher_scores(params: PyTree, key: jax.Array | None = None,
                  sq_grads: PyTree = None) -> PyTree:
  """s = sum_b g_b^2 (the accumulated squared gradients, as given)."""
  del key
  _require_tree("fisher", "sq_grads", params, sq_grads)
  return jax.tree.map(lambda w, s: jnp.asarray(s, jnp.float32), params, sq_grads)


def accumulate_grads(grad_fn: Callable[[PyTree, Any], PyTree], params: PyTree,
                     batches: Iterable[Any],
                     transform: Callable[[jax.Array], jax.Array] = lambda g: g) -> PyTree:
  """sum_b transform(grad_fn(params, batch_b)), leaf by leaf, in float32."""
  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  step = jax.jit(lambda acc, batch: jax.tree.map(lambda a, g: a + transform(g), acc,
                                                 grad_fn(params, batch)))
  for batch in batches:
    total = step(total, batch)
  return total


def accumulate_sq_grads(grad_fn: Callable[[PyTree, Any], PyTree], params: PyTree,
                        batches: Iterable[Any]) -> PyTree:
  """sum_b grad_fn(params, batch_b)^2, leaf by leaf: the FISH Fisher estimate.

  FISH uses per-example gradients (batches of one example, or a `grad_fn` that vmaps over the
  batch and sums the squares itself).
  """
  return accumulate_grads(grad_fn, params, batches, jnp.square)


def _require_tree(init: str, arg: str, params: PyTree, tree: PyTree) -> None:
  if tree is None:
    raise ValueError(f"mask init {init!r} needs {arg}=<a tree like params>")
  if leaf_paths(tree) != leaf_paths(params):
    raise ValueError(f"mask init {init!r}: {arg} must mirror params; paths differ: "
                     f"{sorted(set(leaf_paths(tree)) ^ set(leaf_paths(params)))}")
