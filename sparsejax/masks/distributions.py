"""Per-leaf densities from a global target (uniform, ERK, global top-k), and `make_mask`.

Leaves are split by the structure rules (`leaf_structures`): "dense" leaves are not sparsified;
"fixed" leaves have their density set by their structure (N:M: n / m; fixed patterns) or by an
override; the "free" leaves share the rest of the budget

  target_count = round(target_density sum_{sparse l} size_l)
  budget       = target_count - sum_{fixed l} count_l

following a distribution's relative densities r_l:

  uniform   r_l = 1.
  erk       r_l = (sum_a shape_l[a] / prod_a shape_l[a])^power (Erdős–Rényi-Kernel; power 1 is
            ERK, the shape sum including conv kernel dims). Evci et al. 2020, "Rigging the
            Lottery" (RigL), with their epsilon capping: d_l = min(1, eps r_l), eps solved so that
            sum_l d_l size_l = budget, re-solving after each leaf that caps at 1 is made dense.
  global    one threshold over the scores of all free (unstructured) leaves: the global top
            `budget` scores (global magnitude pruning; FISH's global Fisher top-k). Needs scores,
            so only `make_mask` offers it.

Ideal counts d_l size_l are then made integers in units of each structure's granularity (1
entry, a block, one entry per output neuron for fan_in, a channel) by largest remainder, so the
kept total equals the target exactly whenever the units allow (always for unstructured leaves);
otherwise it falls short by less than the smallest unit. Each free leaf keeps at least one unit.
The returned density of a leaf is count_l / size_l, so `structure_count(spec, shape, density)`
gives back count_l exactly.
"""
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from sparsejax.masks import init as init_lib  # registers MASK_INITS
from sparsejax.masks import structures
from sparsejax.masks.mask import DENSE, Mask, leaf_paths, leaves_by_path, match_rules
from sparsejax.registry import DISTRIBUTIONS, MASK_INITS

PyTree = Any
Spec = tuple[str, dict[str, Any]]

del init_lib


@DISTRIBUTIONS.register("uniform")
def uniform_ratio(shape: tuple[int, ...], power: float = 1.0) -> float:
  """r = 1: every free leaf gets the same density."""
  del shape, power
  return 1.0


@DISTRIBUTIONS.register("erk")
def erk_ratio(shape: tuple[int, ...], power: float = 1.0) -> float:
  """r = (sum(shape) / prod(shape))^power."""
  return (sum(shape) / math.prod(shape)) ** power


@DISTRIBUTIONS.register("global")
def global_ratio(shape: tuple[int, ...], power: float = 1.0) -> float:
  """Placeholder: the global distribution is decided by scores (see `make_mask`)."""
  del shape, power
  raise ValueError("distribution 'global' needs scores; use make_mask(..., "
                   "distribution='global') instead of layer_densities")


# ------------------------------------------------------------------------------ leaf specs


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(
      int(d) for d in leaf.shape)


def leaf_structures(params_shapes_tree: PyTree, rules: Sequence[tuple[str, Any]] = ()
                    ) -> dict[str, Spec]:
  """{path: (structure name, kw)} from `(regex, spec)` rules, first match wins.

  A spec is "dense", a structure name (possibly with encoded kw, "nm:n=2,m=4") or a dict
  {"structure": "nm", "n": 2, "m": 4}. Unmatched leaves: 1-D or scalar leaves (biases, norms)
  "dense", >= 2-D kernels "unstructured".
  """
  specs = {}
  for path, leaf in leaves_by_path(params_shapes_tree).items():
    shape = _shape(leaf)
    spec = match_rules(path, rules, default=None)
    if spec is None:
      spec = DENSE if len(shape) < 2 else "unstructured"
    name, kw = structures.parse_structure(spec)
    specs[path] = (name, kw)
  return specs


def _override_for(path: str, overrides: Mapping[str, float]) -> float | None:
  for pattern, density in overrides.items():
    if pattern == path or re.search(pattern, path):
      return density
  return None


# ----------------------------------------------------------------------------- densities


def layer_densities(params_shapes_tree: PyTree, target_density: float,
                    distribution: str = "uniform", power: float = 1.0,
                    rules: Sequence[tuple[str, Any]] = (),
                    overrides: Mapping[str, float] | None = None) -> dict[str, float]:
  """{path: density} for every leaf (dense leaves 1.0); kept total = the target over sparse leaves.

  Args:
    params_shapes_tree: params, or a tree of anything with `.shape` (ShapeDtypeStructs).
    target_density: global kept fraction over the sparsified leaves, in (0, 1].
    distribution: "uniform" or "erk" (a `DISTRIBUTIONS` name).
    power: ERK exponent.
    rules: (regex, structure spec) pairs, see `leaf_structures`.
    overrides: {path or regex: density} fixing some leaves' densities; the free leaves absorb
      the difference so the global total still meets the target.
  """
  _check_target(target_density)
  ratio_fn = DISTRIBUTIONS.get(distribution)
  plan = _plan(params_shapes_tree, target_density, rules, overrides or {})
  free = plan["free"]
  ratios = {p: ratio_fn(plan["shapes"][p], power) for p in free}
  ideal = _capped_counts(free, plan["shapes"], ratios, plan["budget"])
  counts = _integer_counts(ideal, plan, plan["budget"])
  return _densities(plan, counts)


def _check_target(target_density: float) -> None:
  if not 0.0 < float(target_density) <= 1.0:
    raise ValueError(f"target density must be in (0, 1], got {target_density}")


def _plan(tree: PyTree, target_density: float, rules, overrides) -> dict[str, Any]:
  """Leaves split into dense / fixed / free, fixed counts, and the free budget."""
  specs = leaf_structures(tree, rules)
  shapes = {p: _shape(leaf) for p, leaf in leaves_by_path(tree).items()}
  sizes = {p: math.prod(s) for p, s in shapes.items()}
  sparse = [p for p, (name, _) in specs.items() if name != DENSE]
  fixed, free = {}, []
  for path in sparse:
    name, kw = specs[path]
    override = _override_for(path, overrides)
    if override is not None:
      fixed[path] = structures.structure_count(name, shapes[path], override, **kw)
    elif structures.is_fixed_density(name):
      density = None if name == "nm" else target_density
      fixed[path] = structures.structure_count(name, shapes[path], density, **kw)
    else:
      free.append(path)
  total = sum(sizes[p] for p in sparse)
  target_count = int(round(target_density * total))
  budget = target_count - sum(fixed.values())
  free_size = sum(sizes[p] for p in free)
  if free and not 0 < budget <= free_size:
    raise ValueError(
        f"target density {target_density} needs {target_count} kept entries; fixed leaves "
        f"(N:M, patterns, overrides) keep {sum(fixed.values())}, leaving {budget} for free "
        f"leaves of {free_size} entries, which must be in (0, {free_size}]")
  return {"specs": specs, "shapes": shapes, "sizes": sizes, "fixed": fixed, "free": free,
          "budget": budget if free else 0}


def _capped_counts(free: list[str], shapes, ratios, budget: int) -> dict[str, float]:
  """Ideal counts min(1, eps r_l) size_l with eps solved so that they sum to `budget`."""
  sizes = {p: math.prod(shapes[p]) for p in free}
  capped: set[str] = set()
  while True:
    rest = [p for p in free if p not in capped]
    room = budget - sum(sizes[p] for p in capped)
    weight = sum(ratios[p] * sizes[p] for p in rest)
    eps = room / weight if weight > 0 else 0.0
    newly = {p for p in rest if eps * ratios[p] > 1.0}
    if not newly:
      break
    capped |= newly
  return {p: float(sizes[p]) if p in capped else eps * ratios[p] * sizes[p] for p in free}


def _integer_counts(ideal: dict[str, float], plan, budget: int) -> dict[str, int]:
  """Counts in multiples of each leaf's granularity u_l, by largest remainder, summing to at most
  `budget` (exactly when the units allow), at least one unit per leaf."""
  units = {p: structures.granularity(plan["specs"][p][0], plan["shapes"][p], **plan["specs"][p][1])
           for p in ideal}
  max_units = {p: plan["sizes"][p] // units[p] for p in ideal}
  n_units = {p: int(min(max_units[p], max(1, math.floor(ideal[p] / units[p] + 1e-9))))
             for p in ideal}
  left = budget - sum(n_units[p] * units[p] for p in ideal)
  order = sorted(ideal, key=lambda p: (-(ideal[p] / units[p] - n_units[p]), units[p], p))
  changed = True
  while left > 0 and changed:
    changed = False
    for p in order:
      if n_units[p] < max_units[p] and units[p] <= left:
        n_units[p] += 1
        left -= units[p]
        changed = True
        if left <= 0:
          break
  return {p: n_units[p] * units[p] for p in ideal}


def _densities(plan, counts: dict[str, int]) -> dict[str, float]:
  out = {}
  for path, (name, _) in plan["specs"].items():
    if name == DENSE:
      out[path] = 1.0
    elif path in plan["fixed"]:
      out[path] = plan["fixed"][path] / plan["sizes"][path]
    else:
      out[path] = counts[path] / plan["sizes"][path]
  return out


# ------------------------------------------------------------------------------- make_mask


def make_mask(params: PyTree, density: float, distribution: str = "uniform",
              rules: Sequence[tuple[str, Any]] = (), init: str = "random",
              key: jax.Array | None = None, power: float = 1.0,
              overrides: Mapping[str, float] | None = None, **init_kw) -> Mask:
  """A `Mask` over `params` with global density `density` over the sparsified leaves.

  Scores come from the mask init `init` (`MASK_INITS`: random / magnitude / saliency / fisher,
  its extra arguments in `init_kw`, as `init_inputs` computes them: grads=..., sq_grads=...); each
  leaf keeps its highest scores subject to its structure at the density from `layer_densities`
  (or, for distribution "global", the global top-k over the free leaves). Structure names stored
  in the mask carry their arguments ("nm:m=4,n=2"), so updaters can re-select with
  `structures.select`. Boxed params (`nn.Partitioned`) give a boxed mask with the same leaves as
  their unboxed form.
  """
  _check_target(density)
  scores = MASK_INITS.get(init).scores(params, key=key, **init_kw)
  if distribution == "global":
    densities = _global_densities(params, scores, density, rules, overrides or {})
  else:
    densities = layer_densities(params, density, distribution, power, rules, overrides)
  specs = leaf_structures(params, rules)
  paths = leaf_paths(params)
  leaves = []
  for path, score in zip(paths, jax.tree.leaves(scores)):
    name, kw = specs[path]
    leaf_density = densities[path]
    if name == "nm":
      leaf_density = None
    elif structures.is_fixed_density(name) and name != DENSE:  # a pattern: built from its target
      leaf_density = _override_for(path, overrides or {}) or density
    leaves.append(structures.select(name, score, leaf_density, **kw)
                  if name != DENSE else np.ones(np.shape(score), bool))
  tree = jax.tree.unflatten(jax.tree.structure(params), leaves)
  names = {p: structures.structure_name(specs[p][0], **specs[p][1])
           for p in paths if specs[p][0] != DENSE}
  return Mask.from_leaves(tree, names)


def _global_densities(params, scores, density, rules, overrides) -> dict[str, float]:
  """Densities from one global top-`budget` over the free leaves' scores (all unstructured)."""
  plan = _plan(params, density, rules, overrides)
  flat_scores = leaves_by_path(scores)
  for path in plan["free"]:
    if plan["specs"][path][0] != "unstructured":
      raise ValueError(f"distribution 'global' needs unstructured free leaves; {path!r} is "
                       f"{plan['specs'][path][0]!r} (give it an override or use 'uniform'/'erk')")
  if not plan["free"]:
    return _densities(plan, {})
  all_scores = np.concatenate([np.asarray(flat_scores[p], np.float32).reshape(-1)
                               for p in plan["free"]])
  all_scores = np.where(np.isnan(all_scores), -np.inf, all_scores)
  order = np.argsort(-all_scores, kind="stable")
  keep = np.zeros(all_scores.size, bool)
  keep[order[:plan["budget"]]] = True
  counts, start = {}, 0
  for path in plan["free"]:
    size = plan["sizes"][path]
    counts[path] = int(keep[start:start + size].sum())
    start += size
  for path, count in counts.items():
    if count == 0:
      raise ValueError(f"global top-k keeps nothing of leaf {path!r} at density {density}; "
                       f"use a per-layer distribution or an override for it")
  return _densities(plan, counts)
