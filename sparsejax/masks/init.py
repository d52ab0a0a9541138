"""Initial-mask scores: random, magnitude, saliency (SNIP), Fisher (FISH).

A mask init maps params to a score tree of the same structure; `make_mask` keeps the highest
scores of each leaf subject to its structure and density. Each is registered in `MASK_INITS`
as a `MaskInit` declaring what it needs besides params (`register_init`), so a caller (the
trainer, a notebook) computes its inputs with `init_inputs` without naming any init:

  random      params     s ~ U(0, 1), independent per entry (needs `key`). Mocanu et al. 2018
                         (SET) / Evci et al. 2020 (RigL) start from a random mask.
  magnitude   params     s = |w|. Han et al. 2015, "Learning both Weights and Connections".
  saliency    grads      s = |w g| with g = dL/dw, the mean batch gradient. Lee et al. 2019,
                         "SNIP".
  fisher      sq_grads   s = sum_b g_b^2, accumulated squared gradients (see
                         `accumulate_sq_grads`): the diagonal empirical Fisher. Sung et al. 2021,
                         "Training Neural Networks with Fixed Sparse Masks" (FISH) keep the global
                         top-k (`make_mask(..., distribution="global", init="fisher")`) as the
                         update mask.
"""
import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from sparsejax.masks.mask import leaf_paths, map_leaves
from sparsejax.registry import MASK_INITS

PyTree = Any
GradFn = Callable[[PyTree, Any], PyTree]

# What a mask init needs besides params; "grads" and "sq_grads" are also its keyword arguments.
NEEDS = ("params", "grads", "sq_grads")


@dataclasses.dataclass(frozen=True)
class MaskInit:
  """A registered mask init: `scores(params, key=None, **inputs) -> scores like params`.

  `needs` is "params" (scores from params alone), "grads" (inputs {"grads": mean batch gradient})
  or "sq_grads" (inputs {"sq_grads": summed squared batch gradients}); see `init_inputs`.
  """

  scores: Callable[..., PyTree]
  needs: str = "params"

  def __post_init__(self):
    if self.needs not in NEEDS:
      raise ValueError(f"mask init needs={self.needs!r}; allowed: {', '.join(NEEDS)}")


def register_init(name: str, needs: str = "params") -> Callable[[Callable], Callable]:
  """Decorator registering a score function as the mask init `name` that needs `needs`."""

  def decorate(scores: Callable[..., PyTree]) -> Callable[..., PyTree]:
    MASK_INITS.register(name)(MaskInit(scores, needs))
    return scores

  return decorate


@register_init("random")
def random_scores(params: PyTree, key: jax.Array | None = None) -> PyTree:
  """s ~ U(0, 1) per entry, a different stream per leaf (key folded with the leaf index)."""
  if key is None:
    raise ValueError("mask init 'random' needs key=jax.random.key(seed)")
  leaves, treedef = jax.tree.flatten(params)
  scores = [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(p))
            for i, p in enumerate(leaves)]
  return jax.tree.unflatten(treedef, scores)


@register_init("magnitude")
def magnitude_scores(params: PyTree, key: jax.Array | None = None) -> PyTree:
  """s = |w|."""
  del key
  return jax.tree.map(lambda w: jnp.abs(jnp.asarray(w, jnp.float32)), params)


@register_init("saliency", needs="grads")
def saliency_scores(params: PyTree, key: jax.Array | None = None, grads: PyTree = None) -> PyTree:
  """s = |w g|, the first-order change of the loss when w is removed (SNIP)."""
  del key
  _require_tree("saliency", "grads", params, grads)
  return map_leaves(lambda w, g: jnp.abs(jnp.asarray(w, jnp.float32) * g), params, grads)


@register_init("fisher", needs="sq_grads")
def fisher_scores(params: PyTree, key: jax.Array | None = None,
                  sq_grads: PyTree = None) -> PyTree:
  """s = sum_b g_b^2 (the accumulated squared gradients, as given)."""
  del key
  _require_tree("fisher", "sq_grads", params, sq_grads)
  return map_leaves(lambda w, s: jnp.asarray(s, jnp.float32), params, sq_grads)


def accumulate_grads(grad_fn: GradFn, params: PyTree, batches: Iterable[Any],
                     transform: Callable[[jax.Array], jax.Array] = lambda g: g) -> PyTree:
  """sum_b transform(grad_fn(params, batch_b)), leaf by leaf, in float32, structured like params."""
  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  step = jax.jit(lambda acc, batch: map_leaves(lambda a, g: a + transform(g), acc,
                                               grad_fn(params, batch)))
  for batch in batches:
    total = step(total, batch)
  return total


def accumulate_sq_grads(grad_fn: GradFn, params: PyTree, batches: Iterable[Any]) -> PyTree:
  """sum_b grad_fn(params, batch_b)^2, leaf by leaf: the FISH Fisher estimate.

  FISH uses per-example gradients (batches of one example, or a `grad_fn` that vmaps over the
  batch and sums the squares itself).
  """
  return accumulate_grads(grad_fn, params, batches, jnp.square)


def init_needs(name: str) -> str:
  """What the mask init `name` needs besides params: "params", "grads" or "sq_grads".

  ValueError listing the registered inits if `name` is not one.
  """
  return MASK_INITS.get(name).needs


def init_inputs(name: str, grad_fn: GradFn, params: PyTree, batches: Sequence[Any]
                ) -> dict[str, PyTree]:
  """The keyword arguments `make_mask(..., init=name, **inputs)` needs, from the batch gradients
  g_b = grad_fn(params, batch_b), b = 1..n:

    params     {}                            (no gradient is computed)
    grads      {"grads": (1/n) sum_b g_b}    (saliency: |w mean_b g_b|, SNIP)
    sq_grads   {"sq_grads": sum_b g_b^2}     (fisher: `accumulate_sq_grads` of batch, not
                                             per-example, gradients)

  ValueError if the init needs gradients and `batches` is empty.
  """
  needs = init_needs(name)
  if needs == "params":
    return {}
  batches = list(batches)
  if not batches:
    raise ValueError(f"mask init {name!r} needs {needs} from batch gradients; batches is empty")
  if needs == "grads":
    total = accumulate_grads(grad_fn, params, batches)
    return {"grads": jax.tree.map(lambda g: g / len(batches), total)}
  return {"sq_grads": accumulate_sq_grads(grad_fn, params, batches)}


def _require_tree(init: str, arg: str, params: PyTree, tree: PyTree) -> None:
  if tree is None:
    raise ValueError(f"mask init {init!r} needs {arg}=<a tree like params>")
  if leaf_paths(tree) != leaf_paths(params):
    raise ValueError(f"mask init {init!r}: {arg} must mirror params; paths differ: "
                     f"{sorted(set(leaf_paths(tree)) ^ set(leaf_paths(params)))}")
