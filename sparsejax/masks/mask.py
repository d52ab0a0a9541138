"""The `Mask` pytree: one boolean leaf per parameter, mirroring the params tree.

A mask never has `None` leaves. A parameter that is not sparsified gets an explicit all-true
leaf of its own shape and the structure name "dense", so `jax.tree.map(f, params, mask.leaves)`
always lines up, masks shard exactly like their params (same shapes, same partition specs),
and Orbax saves and restores them like any other array tree.

  mask = Mask.dense_like(params)            # every leaf all-true, structure "dense"
  params = mask.apply(params)               # w * m, leaf by leaf
  mask.density()                            # {"params/Dense_0/kernel": 0.1, ...}
  mask.global_density()                     # nnz / size over the sparsified leaves

Per-leaf choices (which structure, which density) come from path rules, regexes on the
'/'-joined param path tried in order like the sharding rules; see `match_rules`. Params may be
boxed, as `model.init` returns them for layers annotated with `nn.with_logical_partitioning`
(`nn.Partitioned` / `nn.LogicallyPartitioned` leaves): the path of a boxed leaf is the path of
its box ("params/Dense_0/kernel", not ".../kernel/value"), and a mask over boxed params has
boxed leaves, so it still mirrors params exactly.

Kernel axis convention used by every structure: the last axis is the output axis, the one
before it the input axis (`(in, out)` for `nn.Dense`, `(H, W, in, out)` for `nn.Conv`,
`(E, D, F)` for MoE experts); leading axes are independent batches of the same structure.
"""
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

DENSE = "dense"

PyTree = Any


def path_str(key_path: Sequence[Any]) -> str:
  """The '/'-joined name of a key path, e.g. "params/Dense_0/kernel"."""
  return "/".join(_key_name(k) for k in key_path)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def is_box(node: Any) -> bool:
  """True for a Flax metadata box (`nn.Partitioned`, `nn.LogicallyPartitioned`)."""
  return isinstance(node, nn.meta.AxisMetadata)


def _inside_box(box_key_path: tuple[Any, ...], box: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """[(key path, leaf)] of a box's leaves: its own key path, then the leaf's inside its value."""
  return [(box_key_path + inner[1:], leaf)  # inner[0] is the box's field ("value")
          for inner, leaf in jax.tree_util.tree_flatten_with_path(box)[0]]


def map_with_key_paths(fn: Any, tree: PyTree) -> PyTree:
  """`jax.tree_util.tree_map_with_path(fn, tree)`, a boxed leaf getting the key path of its box.

  Boxes stay in place around `fn`'s outputs.
  """

  def outside_boxes(key_path, node):
    if is_box(node):
      return jax.tree.unflatten(jax.tree.structure(node),
                                [fn(*item) for item in _inside_box(key_path, node)])
    return fn(key_path, node)

  return jax.tree_util.tree_map_with_path(outside_boxes, tree, is_leaf=is_box)


def flatten_with_key_paths(tree: PyTree) -> list[tuple[tuple[Any, ...], Any]]:
  """[(key path, leaf)] in `jax.tree.leaves` order, a boxed leaf with the key path of its box."""
  flat = []
  for key_path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
    flat += _inside_box(key_path, node) if is_box(node) else [(key_path, node)]
  return flat


def leaf_paths(tree: PyTree) -> list[str]:
  """The '/'-joined paths of the leaves of `tree` in `jax.tree.leaves` order, boxes see-through."""
  return [path_str(key_path) for key_path, _ in flatten_with_key_paths(tree)]


def leaves_by_path(tree: PyTree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of `tree` (boxes see-through)."""
  return {path_str(key_path): leaf for key_path, leaf in flatten_with_key_paths(tree)}


def map_leaves(fn: Any, tree: PyTree, *others: PyTree) -> PyTree:
  """`fn(leaf, *other_leaves)` leaf by leaf in leaf order, in `tree`'s structure.

  Unlike `jax.tree.map`, `others` may be boxed where `tree` is not, or the reverse (a box holds
  one leaf, so boxing keeps the leaf order); callers check that the paths agree.
  """
  leaves, treedef = jax.tree.flatten(tree)
  columns = [jax.tree.leaves(other) for other in others]
  return jax.tree.unflatten(treedef, [fn(*xs) for xs in zip(leaves, *columns, strict=True)])


def match_rules(path: str, rules: Iterable[tuple[str, Any]], default: Any = None) -> Any:
  """The value of the first `(regex, value)` rule whose regex `re.search`es `path`."""
  for pattern, value in rules:
    if re.search(pattern, path):
      return value
  return default


def map_param_like(fn: Any, state: PyTree, params: PyTree, per_param: PyTree,
                   other: Any = lambda leaf: leaf) -> PyTree:
  """`fn(leaf, v)` on each leaf of `state` shaped like a param, `other(leaf)` on the rest.

  A leaf is shaped like a param when a suffix of its key path is the param's key path and the
  shapes agree (Adam mu/nu, momentum traces, also inside chains, masked and multi_transform
  states); `v` is that param's leaf of `per_param` (a tree like `params`: shardings, masks).
  Boxed and unboxed params and states match alike.
  """
  by_path = {
      jax.tree_util.keystr(path): (tuple(np.shape(p)), v)
      for (path, p), v in zip(flatten_with_key_paths(params), jax.tree.leaves(per_param),
                              strict=True)
  }

  def apply(path, leaf):
    if hasattr(leaf, "shape"):
      for start in range(len(path) + 1):
        shape, value = by_path.get(jax.tree_util.keystr(path[start:]), (None, None))
        if shape == tuple(leaf.shape):
          return fn(leaf, value)
    return other(leaf)

  return map_with_key_paths(apply, state)


@flax.struct.dataclass
class Mask:
  """Boolean leaves mirroring a params tree, plus each leaf's structure name.

  Attributes:
    leaves: a pytree with the params' structure; each leaf a bool array of the param's shape.
    structures: static tuple of (path, structure name) pairs, one per leaf, in leaf order;
      "dense" marks a parameter that is not sparsified (its leaf is all true).
  """

  leaves: PyTree
  structures: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False)

  @classmethod
  def dense_like(cls, params: PyTree) -> "Mask":
    """An all-true mask over `params` with every structure "dense"."""
    leaves = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)
    return cls(leaves, tuple((path, DENSE) for path in leaf_paths(params)))

  @classmethod
  def from_leaves(cls, leaves: PyTree, structures: dict[str, str] | None = None) -> "Mask":
    """A mask from bool leaves; `structures` maps paths to names (missing paths: "dense")."""
    structures = structures or {}
    paths = leaf_paths(leaves)
    unknown = sorted(set(structures) - set(paths))
    if unknown:
      raise ValueError(f"structures name paths not in the mask: {unknown}; paths: {paths}")
    leaves = jax.tree.map(lambda m: jnp.asarray(m, jnp.bool_), leaves)
    return cls(leaves, tuple((path, structures.get(path, DENSE)) for path in paths))

  def structure_of(self, path: str) -> str:
    return dict(self.structures)[path]

  def paths(self) -> list[str]:
    return [path for path, _ in self.structures]

  def sparse_paths(self) -> list[str]:
    """Paths whose structure is not "dense"."""
    return [path for path, name in self.structures if name != DENSE]

  def flat(self) -> dict[str, jax.Array]:
    """{path: bool leaf}."""
    return dict(zip(self.paths(), jax.tree.leaves(self.leaves)))

  def replace_leaves(self, leaves: PyTree) -> "Mask":
    """The same structures with new leaves (same tree structure and shapes)."""
    return self.replace(leaves=leaves)

  def mirroring(self, params: PyTree) -> "Mask":
    """This mask with the tree structure of `params` (boxed where params are boxed or not).

    ValueError if their paths or shapes differ (`check_mask_matches`).
    """
    check_mask_matches(params, self)
    return self.replace_leaves(map_leaves(lambda p, m: m, params, self.leaves))

  def apply(self, params: PyTree) -> PyTree:
    """params * mask, leaf by leaf (masked entries become exact zeros of the param's dtype)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params,
                        self.mirroring(params).leaves)

  def nnz(self) -> dict[str, int]:
    """Kept entries per leaf (host ints)."""
    return {path: int(np.asarray(m).sum()) for path, m in self.flat().items()}

  def sizes(self) -> dict[str, int]:
    return {path: int(np.prod(np.shape(m))) for path, m in self.flat().items()}

  def density(self) -> dict[str, float]:
    """Kept fraction per leaf, exact (host floats)."""
    nnz, sizes = self.nnz(), self.sizes()
    return {path: nnz[path] / max(sizes[path], 1) for path in nnz}

  def global_density(self, include_dense: bool = False) -> float:
    """Kept entries / entries over the sparsified leaves (all leaves if `include_dense`)."""
    paths = self.paths() if include_dense else self.sparse_paths()
    if not paths:
      return 1.0
    nnz, sizes = self.nnz(), self.sizes()
    return sum(nnz[p] for p in paths) / sum(sizes[p] for p in paths)


def check_mask_matches(params: PyTree, mask: Mask) -> None:
  """Raise a ValueError naming the first leaf whose path or shape differs from `params`."""
  param_paths, mask_paths = leaf_paths(params), mask.paths()
  if param_paths != mask_paths:
    missing = sorted(set(param_paths) ^ set(mask_paths))
    raise ValueError(f"mask and params have different leaves; differing paths: {missing}")
  for path, p, m in zip(param_paths, jax.tree.leaves(params), jax.tree.leaves(mask.leaves)):
    if np.shape(p) != np.shape(m):
      raise ValueError(f"mask leaf {path!r} has shape {np.shape(m)}, param has {np.shape(p)}")
