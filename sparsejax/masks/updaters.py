"""Mask updaters: pruning, dynamic sparse training (SET, RigL, SRigL, sparse momentum), N:M
training (SR-STE, progressive gradient flow) and regularisation-based pruning.

Two layers, as everywhere in sparsejax:

1. Pure per-leaf functions on arrays, jit-safe with traced counts (a count may be a Python int
   or a traced int32 scalar, so a schedule's value can drive it inside `jit`):
     `drop_lowest`, `grow_highest`, `set_update`, `rigl_update`, `srigl_update`,
     `magnitude_prune`, `sparse_momentum_update`, `nm_mask`, `srste_grads`, `pgf_grads`.
   Selections rank with a stable sort: among equal scores the lower flat index wins.
2. `Updater` objects (registered in `UPDATERS`) that `sparsejax.masks.wrap` drives:
     init(params, mask) -> state                  updater state, a pytree
     initial_mask(params, mask) -> Mask           e.g. N:M of the initial weights
     observe(state, params, grads, mask, step)    every step (momentum, active counts)
     grads(grads, params, mask, state, step)      the gradient fed to the inner optimizer
     update(mask, state, params, grads, value, key, step) -> (mask, state)   on schedule steps
   `consumes` names the schedule value an updater reads ("sparsity", "drop_fraction" or None);
   `dense_weights` is True when masked weights keep training (SR-STE, PGF): the forward pass
   must then use `mask.apply(params)`.

Growth never picks a position that was active before the drop, so the positions that change
are exactly the dropped ones plus the grown ones, and for SET / RigL / SRigL |grown| == |dropped|.
Kernel axes follow `sparsejax.masks.mask`: inputs on axis -2, outputs on axis -1; the constant
fan-in structure ("fan_in") keeps the same count per output neuron (per column).
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sparsejax.masks import regularizers
from sparsejax.masks.mask import DENSE, Mask, path_str
from sparsejax.masks.structures import parse_structure, select
from sparsejax.registry import UPDATERS

PyTree = Any
Count = Any  # int or int32 scalar (possibly traced), or an int array broadcastable per column

SWAP_STRUCTURES = ("unstructured", "fan_in")
# Structures `magnitude_prune` ranks through `structures.select` at a (possibly traced) density.
PRUNE_STRUCTURES = ("unstructured", "fan_in", "channel", "block")


# ---------------------------------------------------------------------------------------------
# Ranking primitives.


def _descending_rank(score: jax.Array, axis: int | None) -> jax.Array:
  """rank 0 for the highest score (whole array if axis is None, else along `axis`); stable."""
  if axis is None:
    flat = score.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return rank.reshape(score.shape)
  return jnp.argsort(jnp.argsort(-score, axis=axis, stable=True), axis=axis, stable=True)


def grow_highest(score: jax.Array, allowed: jax.Array, n: Count,
                 axis: int | None = None) -> jax.Array:
  """The n highest-score entries among `allowed` (per slice along `axis` if given).

  n must not exceed the allowed count (per slice); callers clamp it.
  """
  score = jnp.where(allowed, score.astype(jnp.float32), -jnp.inf)
  return allowed & (_descending_rank(score, axis) < n)


def drop_lowest(score: jax.Array, mask: jax.Array, n: Count, axis: int | None = None) -> jax.Array:
  """`mask` without its n lowest-score active entries (per slice along `axis` if given)."""
  return mask & ~grow_highest(-score.astype(jnp.float32), mask, n, axis)


def _round_count(fraction, count) -> jax.Array:
  return jnp.round(jnp.asarray(fraction, jnp.float32) * count).astype(jnp.int32)


def swap_count(drop_fraction, mask: jax.Array, axis: int | None = None) -> jax.Array:
  """n = min(round(f · nnz), size − nnz): how many to drop and regrow (per column if axis=-2).

  With axis=-2 the count is per output neuron, from the largest fan-in in the leaf.
  """
  if axis is None:
    nnz = jnp.sum(mask, dtype=jnp.int32)
    return jnp.minimum(_round_count(drop_fraction, nnz), mask.size - nnz)
  fan_in = jnp.max(jnp.sum(mask, axis=axis, dtype=jnp.int32))
  return jnp.minimum(_round_count(drop_fraction, fan_in), mask.shape[axis] - fan_in)


# ---------------------------------------------------------------------------------------------
# Pure per-leaf updates.


def set_update(w: jax.Array, mask: jax.Array, n_swap: Count, key: jax.Array,
               axis: int | None = None) -> jax.Array:
  """SET: drop the n_swap smallest |w| among active, regrow n_swap uniformly among inactive.

  m' = (m \\ argmin_n |w|) ∪ random_n(¬m); per output neuron with axis=-2 (fan-in kept).
  Mocanu et al. (2018), "Scalable training of artificial neural networks ... (SET)".
  """
  kept = drop_lowest(jnp.abs(w), mask, n_swap, axis)
  grown = grow_highest(jax.random.uniform(key, mask.shape), ~mask, n_swap, axis)
  return kept | grown


def rigl_update(w: jax.Array, g: jax.Array, mask: jax.Array, n_swap: Count,
                bonus: jax.Array | None = None, axis: int | None = None) -> jax.Array:
  """RigL: drop the n_swap smallest active |w|, grow the n_swap largest |g| (+ bonus) elsewhere.

  m' = (m \\ argmin_n |w|) ∪ argmax_n(|g| + bonus over ¬m). Evci et al. (2020), "Rigging the
  Lottery"; an exploration `bonus` (see `exploration_bonus`) follows DST-EE (Huang et al., 2023).
  """
  score = jnp.abs(g).astype(jnp.float32)
  if bonus is not None:
    score = score + bonus
  return drop_lowest(jnp.abs(w), mask, n_swap, axis) | grow_highest(score, ~mask, n_swap, axis)


def exploration_bonus(active_steps: jax.Array, step: jax.Array, coefficient: float) -> jax.Array:
  """UCB-style acquisition bonus c · sqrt(ln(t + 1) / (N + 1)), N = steps the weight was active.

  Huang et al. (2023), "Dynamic Sparse Training via Balancing the Exploration-Exploitation
  Trade-off" (DST-EE): rarely explored positions get a larger bonus.
  """
  t = jnp.asarray(step, jnp.float32)
  return coefficient * jnp.sqrt(jnp.log(t + 1.0) / (active_steps.astype(jnp.float32) + 1.0))


def srigl_update(w_IO: jax.Array, g_IO: jax.Array, mask_IO: jax.Array, drop_fraction,
                 target_nnz: Count | None = None, gamma_sal: float = 0.0,
                 bonus: jax.Array | None = None) -> jax.Array:
  """SRigL: RigL per output neuron with constant fan-in, plus dynamic neuron ablation.

  Salient weights are those RigL would keep or grow layer-wide (n = round(f · nnz)); a live
  neuron with fewer than γ_sal · k salient weights (k its fan-in) is ablated (its column
  emptied). The fan-in becomes k' = min(I, target_nnz // live neurons); each live neuron drops
  d = min(round(f · k), I − k') smallest |w| and grows k' − k + d largest |g| among its inactive
  inputs (|g| + `bonus` when given). Without ablation every live neuron keeps exactly k' = k.
  Leading axes of w_...IO are batches of neurons.
  Lasby et al. (2023), "Dynamic Sparse Training with Structured Sparsity".
  """
  n_in = mask_IO.shape[-2]
  col_nnz = jnp.sum(mask_IO, axis=-2, keepdims=True, dtype=jnp.int32)
  alive = col_nnz > 0
  fan_in = jnp.max(col_nnz)
  if target_nnz is None:
    target_nnz = jnp.sum(mask_IO, dtype=jnp.int32)
  grow_score = jnp.abs(g_IO).astype(jnp.float32)
  if bonus is not None:
    grow_score = grow_score + bonus
  if gamma_sal > 0:
    n_layer = swap_count(drop_fraction, mask_IO)
    salient = rigl_update(w_IO, grow_score, mask_IO, n_layer)
    salient_count = jnp.sum(salient, axis=-2, keepdims=True, dtype=jnp.int32)
    ablate = alive & (salient_count < gamma_sal * fan_in)
    ablate = jnp.where(jnp.all(ablate | ~alive), False, ablate)  # never ablate every neuron
    alive = alive & ~ablate
  n_alive = jnp.maximum(jnp.sum(alive, dtype=jnp.int32), 1)
  new_fan_in = jnp.minimum(n_in, target_nnz // n_alive)
  n_drop = jnp.clip(_round_count(drop_fraction, fan_in), 0, n_in - new_fan_in)
  kept = drop_lowest(jnp.abs(w_IO), mask_IO & alive, n_drop, axis=-2)
  n_grow = new_fan_in - fan_in + n_drop
  grown = grow_highest(grow_score, ~mask_IO & alive, n_grow, axis=-2)
  return kept | grown


def magnitude_prune(w: jax.Array, mask: jax.Array, density, structure: str = "unstructured",
                    power: float = 1.0, **kw) -> jax.Array:
  """Keep the largest-magnitude active units so the leaf holds the structure's count at `density`.

  m' = m ∧ select(structure, where(m, |w|^p, −∞), density): round(d · size) entries
  ("unstructured"), round(d · I) per output neuron ("fan_in"), whole channels / b0 x b1 blocks
  ranked by Σ |w|^p over the group ("channel", "block"; p = 2 ranks by ‖w_g‖₂). Pruned units
  never come back; `density` may be traced. Zhu & Gupta (2017) with the polynomial schedule.
  """
  score = jnp.abs(w).astype(jnp.float32) ** power
  return mask & select(structure, jnp.where(mask, score, -jnp.inf), density, **kw)


def apportion(total: Count, weights_L: jax.Array, caps_L: jax.Array) -> jax.Array:
  """Integers r_L ≤ caps_L, Σ r_L = min(total, Σ caps_L), r_L ∝ weights_L (largest remainder).

  A layer that hits its cap hands its excess to the others, re-apportioned by weight.
  """
  caps_L = caps_L.astype(jnp.int32)
  total = jnp.minimum(jnp.asarray(total, jnp.int32), jnp.sum(caps_L))
  counts_L = jnp.zeros_like(caps_L)
  for _ in range(caps_L.shape[0] + 1):
    room_L = caps_L - counts_L
    open_L = room_L > 0
    remaining = total - jnp.sum(counts_L)
    w_L = jnp.where(open_L, jnp.maximum(weights_L.astype(jnp.float32), 0.0), 0.0)
    w_L = jnp.where(jnp.sum(w_L) > 0, w_L, open_L.astype(jnp.float32))
    share_L = remaining * w_L / jnp.maximum(jnp.sum(w_L), 1e-30)
    base_L = jnp.floor(share_L).astype(jnp.int32)
    extra = remaining - jnp.sum(base_L)
    frac_L = jnp.where(open_L, share_L - base_L, -1.0)
    base_L = base_L + (_descending_rank(frac_L, None) < extra).astype(jnp.int32)
    counts_L = counts_L + jnp.minimum(base_L, room_L)
  return counts_L


def sparse_momentum_update(ws: Sequence[jax.Array], moms: Sequence[jax.Array],
                           masks: Sequence[jax.Array], drop_fraction) -> list[jax.Array]:
  """Sparse momentum: prune per layer, regrow across layers in proportion to mean |momentum|.

  Layer l drops n_l = min(round(f · nnz_l), size_l − nnz_l) smallest |w|; the R = Σ n_l freed
  weights are apportioned to layers by c_l = mean of |mom| over l's active weights (exactly R
  in total, capped by each layer's inactive count) and grown where |mom| is largest among
  l's inactive weights, so the global kept count is unchanged.
  Dettmers & Zettlemoyer (2019), "Sparse Networks from Scratch: Faster Training without Losing
  Performance".
  """
  kept, drops, caps, contrib = [], [], [], []
  for w, mom, m in zip(ws, moms, masks):
    nnz = jnp.sum(m, dtype=jnp.int32)
    n_drop = swap_count(drop_fraction, m)
    kept.append(drop_lowest(jnp.abs(w), m, n_drop))
    drops.append(n_drop)
    caps.append(m.size - nnz)
    contrib.append(jnp.sum(jnp.where(m, jnp.abs(mom), 0.0)) / jnp.maximum(nnz, 1))
  grow_L = apportion(sum(drops), jnp.stack(contrib), jnp.stack(caps))
  return [k | grow_highest(jnp.abs(mom), ~m, grow_L[i])
          for i, (k, mom, m) in enumerate(zip(kept, moms, masks))]


def nm_mask(w: jax.Array, n: int, m: int) -> jax.Array:
  """Keep the n largest |w| in every group of m consecutive inputs (axis -2) per output."""
  return select("nm", jnp.abs(w), None, n=n, m=m)


def srste_grads(g: jax.Array, w: jax.Array, mask: jax.Array, lam: float) -> jax.Array:
  """SR-STE gradient for dense weights: g + λ_W (1 − m) ⊙ w, g taken at the pruned weights m ⊙ w.

  Zhou et al. (2021), "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch".
  """
  return g + lam * jnp.where(mask, 0.0, w).astype(g.dtype)


def pgf_grads(g: jax.Array, mask: jax.Array, beta) -> jax.Array:
  """Decayed gradient flow to pruned weights: g ⊙ (m + β_t (1 − m)).

  Bambhaniya et al. (2024), "Progressive Gradient Flow for Robust N:M Sparsity Training in
  Transformers" (masked decayed gradient flow).
  """
  return g * jnp.where(mask, 1.0, jnp.asarray(beta, jnp.float32)).astype(g.dtype)


def linear_decay(step, begin: int, end: int) -> jax.Array:
  """1 before `begin`, 0 after `end`, linear in between."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.clip((end - t) / max(end - begin, 1), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Updater objects.


def _leaves_with_structures(mask: Mask, *trees: PyTree):
  """[(path, structure, mask_leaf, *tree_leaves)] in leaf order."""
  per_tree = [jax.tree.leaves(t) for t in trees]
  return [(path, name, m, *(leaves[i] for leaves in per_tree))
          for i, ((path, name), m) in enumerate(zip(mask.structures, jax.tree.leaves(mask.leaves)))]


def _with_leaves(mask: Mask, new_leaves: list[jax.Array]) -> Mask:
  return mask.replace_leaves(jax.tree.unflatten(jax.tree.structure(mask.leaves), new_leaves))


def _masked_grads(grads: PyTree, mask: Mask) -> PyTree:
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, mask.leaves)


def _full_like_params(params: PyTree, dtype) -> PyTree:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


@dataclasses.dataclass(frozen=True)
class Updater:
  """Base updater: a fixed mask ("static"); masked gradients, no state, no mask change.

  Structure arguments (block size, n and m) come from the leaf's structure name, e.g.
  "block:block=4x4" (`sparsejax.masks.structures.structure_name`).
  """

  consumes = None
  dense_weights = False

  def check(self, mask: Mask) -> None:
    """ValueError naming the first leaf whose structure this updater cannot handle."""

  def init(self, params: PyTree, mask: Mask) -> PyTree:
    return {}

  def initial_mask(self, params: PyTree, mask: Mask) -> Mask:
    return mask

  def observe(self, state, params, grads, mask: Mask, step) -> PyTree:
    return state

  def grads(self, grads, params, mask: Mask, state, step) -> PyTree:
    return _masked_grads(grads, mask)

  def update(self, mask: Mask, state, params, grads, value, key, step) -> tuple[Mask, PyTree]:
    return mask, state


UPDATERS.register("static")(Updater)


def structure_kind(name: str) -> str:
  """The registry name of a structure spec: "nm:n=2,m=4" -> "nm"."""
  return parse_structure(name)[0]


def _check_structures(mask: Mask, allowed: tuple[str, ...], who: str) -> None:
  for path, name in mask.structures:
    if name != DENSE and structure_kind(name) not in allowed:
      raise ValueError(f"{who} supports structures {allowed}; leaf {path!r} has structure {name!r}")


@UPDATERS.register("magnitude")
@dataclasses.dataclass(frozen=True)
class Magnitude(Updater):
  """Gradual magnitude pruning to the schedule's sparsity s_t.

  Per leaf (scope "per_leaf"): density d_l,t = 1 − s_t, or with final `densities` {path: d_l}
  (e.g. ERK from `layer_densities`) d_l,t = 1 − (1 − d_l) · min(1, s_t / s_ref), where s_ref =
  1 − Σ d_l n_l / Σ n_l, so the global sparsity follows s_t and each leaf ends at d_l.
  Scope "global" ranks |w| over all (unstructured) sparse leaves at once.
  Zhu & Gupta (2017), "To prune, or not to prune".
  """

  densities: Any = None
  scope: str = "per_leaf"
  consumes = "sparsity"
  power = 1.0

  def check(self, mask):
    if self.scope not in ("per_leaf", "global"):
      raise ValueError(f"scope must be 'per_leaf' or 'global', got {self.scope!r}")
    allowed = PRUNE_STRUCTURES if self.scope == "per_leaf" else ("unstructured",)
    _check_structures(mask, allowed, f"{type(self).__name__} (scope={self.scope!r})")
    if self.densities is not None:
      missing = sorted(set(mask.sparse_paths()) - set(dict(self.densities)))
      if missing:
        raise ValueError(f"densities has no entry for sparse leaves {missing}")

  def leaf_densities(self, mask: Mask, sparsity) -> dict[str, jax.Array]:
    sparse = mask.sparse_paths()
    if self.densities is None:
      return {p: 1.0 - sparsity for p in sparse}
    dens, sizes = dict(self.densities), mask.sizes()
    s_ref = 1.0 - sum(dens[p] * sizes[p] for p in sparse) / max(sum(sizes[p] for p in sparse), 1)
    ratio = jnp.minimum(1.0, sparsity / s_ref) if s_ref > 0 else 1.0
    return {p: 1.0 - (1.0 - dens[p]) * ratio for p in sparse}

  def update(self, mask, state, params, grads, value, key, step):
    if self.scope == "global":
      return _with_leaves(mask, _global_magnitude(mask, params, 1.0 - value)), state
    densities = self.leaf_densities(mask, value)
    new = []
    for path, name, m, w in _leaves_with_structures(mask, params):
      if name == DENSE:
        new.append(m)
      else:
        new.append(magnitude_prune(w, m, densities[path], name, self.power))
    return _with_leaves(mask, new), state


def _global_magnitude(mask: Mask, params: PyTree, density) -> list[jax.Array]:
  """One |w| ranking over every sparse leaf; keeps round(density · Σ sizes) in total."""
  items = _leaves_with_structures(mask, params)
  sparse = [(m, w) for _, name, m, w in items if name != DENSE]
  if not sparse:
    return [m for _, _, m, _ in items]
  flat_m = jnp.concatenate([m.reshape(-1) for m, _ in sparse])
  flat_w = jnp.concatenate([w.reshape(-1).astype(jnp.float32) for _, w in sparse])
  n_drop = jnp.maximum(jnp.sum(flat_m, dtype=jnp.int32) - _round_count(density, flat_m.size), 0)
  flat_new = drop_lowest(jnp.abs(flat_w), flat_m, n_drop)
  out, offset = [], 0
  for _, name, m, _ in items:
    if name == DENSE:
      out.append(m)
    else:
      out.append(flat_new[offset:offset + m.size].reshape(m.shape))
      offset += m.size
  return out


@dataclasses.dataclass(frozen=True)
class _Swap(Updater):
  """Drop-and-grow at a constant per-leaf count (per neuron for "fan_in" leaves)."""

  consumes = "drop_fraction"

  def check(self, mask):
    _check_structures(mask, SWAP_STRUCTURES, type(self).__name__)

  def swap_leaf(self, path, w, g, m, value, key, state, step, axis):
    raise NotImplementedError

  def update(self, mask, state, params, grads, value, key, step):
    new = []
    for i, (path, name, m, w, g) in enumerate(_leaves_with_structures(mask, params, grads)):
      if name == DENSE:
        new.append(m)
        continue
      axis = -2 if structure_kind(name) == "fan_in" else None
      leaf_key = jax.random.fold_in(key, i)
      new.append(self.swap_leaf(path, w, g, m, value, leaf_key, state, step, axis))
    return _with_leaves(mask, new), state


@UPDATERS.register("set")
@dataclasses.dataclass(frozen=True)
class SET(_Swap):
  """SET: magnitude drop, uniform random regrowth (`set_update`)."""

  def swap_leaf(self, path, w, g, m, value, key, state, step, axis):
    return set_update(w, m, swap_count(value, m, axis), key, axis)


@UPDATERS.register("rigl")
@dataclasses.dataclass(frozen=True)
class RigL(_Swap):
  """RigL: magnitude drop, gradient regrowth (`rigl_update`).

  exploration > 0 adds the DST-EE bonus c · sqrt(ln(t + 1) / (N + 1)) to |g|, N counting the
  steps each weight has been active (kept in the updater state).
  """

  exploration: float = 0.0

  def init(self, params, mask):
    if self.exploration > 0:
      return {"active_steps": _full_like_params(params, jnp.int32)}
    return {}

  def observe(self, state, params, grads, mask, step):
    if self.exploration > 0:
      state = dict(state, active_steps=jax.tree.map(lambda n, m: n + m.astype(jnp.int32),
                                                    state["active_steps"], mask.leaves))
    return state

  def bonus(self, path, state, step):
    if self.exploration <= 0:
      return None
    return exploration_bonus(_leaf_at(state["active_steps"], path), step, self.exploration)

  def swap_leaf(self, path, w, g, m, value, key, state, step, axis):
    return rigl_update(w, g, m, swap_count(value, m, axis), self.bonus(path, state, step), axis)


def _leaf_at(tree: PyTree, path: str) -> jax.Array:
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if path_str(key_path) == path:
      return leaf
  raise KeyError(path)


@UPDATERS.register("srigl")
@dataclasses.dataclass(frozen=True)
class SRigL(RigL):
  """SRigL: `srigl_update` on "fan_in" leaves (constant fan-in, neuron ablation when a neuron's
  salient fan-in falls below gamma_sal · k; gamma_sal = 0 turns ablation off), RigL elsewhere.
  The per-leaf kept count at init is the target the fan-in is re-derived from after ablation."""

  gamma_sal: float = 0.3

  def init(self, params, mask):
    state = super().init(params, mask)
    state["target_nnz"] = {path: jnp.sum(m, dtype=jnp.int32) for path, m in mask.flat().items()
                           if structure_kind(mask.structure_of(path)) == "fan_in"}
    return state

  def swap_leaf(self, path, w, g, m, value, key, state, step, axis):
    if axis is None:
      return super().swap_leaf(path, w, g, m, value, key, state, step, axis)
    return srigl_update(w, g, m, value, state["target_nnz"][path], self.gamma_sal,
                        self.bonus(path, state, step))


@UPDATERS.register("sparse_momentum")
@dataclasses.dataclass(frozen=True)
class SparseMomentum(Updater):
  """Sparse momentum (`sparse_momentum_update`) over all unstructured sparse leaves, with its
  own momentum buffer mom ← β mom + g of the dense gradients."""

  beta: float = 0.9
  consumes = "drop_fraction"

  def check(self, mask):
    _check_structures(mask, ("unstructured",), "SparseMomentum")

  def init(self, params, mask):
    return {"momentum": _full_like_params(params, jnp.float32)}

  def observe(self, state, params, grads, mask, step):
    mom = jax.tree.map(lambda v, g: self.beta * v + g.astype(jnp.float32), state["momentum"], grads)
    return dict(state, momentum=mom)

  def update(self, mask, state, params, grads, value, key, step):
    items = _leaves_with_structures(mask, params, state["momentum"])
    sparse = [i for i, item in enumerate(items) if item[1] != DENSE]
    grown = sparse_momentum_update([items[i][3] for i in sparse], [items[i][4] for i in sparse],
                                   [items[i][2] for i in sparse], value)
    new = [item[2] for item in items]
    for i, leaf in zip(sparse, grown):
      new[i] = leaf
    return _with_leaves(mask, new), state


@dataclasses.dataclass(frozen=True)
class _NM(Updater):
  """N:M with dense weights: the mask is the N:M of |w| (n, m from each leaf's structure name,
  e.g. "nm:m=4,n=2"), recomputed on schedule steps (use update_every=1); the forward pass uses
  m ⊙ w and the gradient is taken there."""

  dense_weights = True

  def check(self, mask):
    _check_structures(mask, ("nm",), type(self).__name__)
    for path, name in mask.structures:
      if name != DENSE and not {"n", "m"} <= set(parse_structure(name)[1]):
        raise ValueError(f"leaf {path!r} has structure {name!r}; N:M updaters need n and m in "
                         f"it, e.g. 'nm:m=4,n=2'")

  def nm_leaves(self, mask, params):
    return [m if name == DENSE else nm_mask(w, **parse_structure(name)[1])
            for _, name, m, w in _leaves_with_structures(mask, params)]

  def initial_mask(self, params, mask):
    return _with_leaves(mask, self.nm_leaves(mask, params))

  def update(self, mask, state, params, grads, value, key, step):
    return _with_leaves(mask, self.nm_leaves(mask, params)), state


@UPDATERS.register("nm_srste")
@dataclasses.dataclass(frozen=True)
class NMSRSTE(_NM):
  """N:M with SR-STE: the gradient for the dense weights is `srste_grads` (λ_W = lam)."""

  lam: float = 2e-4

  def grads(self, grads, params, mask, state, step):
    return jax.tree.map(lambda g, w, m: srste_grads(g, w, m, self.lam), grads, params, mask.leaves)


@UPDATERS.register("nm_pgf")
@dataclasses.dataclass(frozen=True)
class NMPGF(_NM):
  """N:M with progressive gradient flow: pruned weights get g · β_t, β_t decaying linearly from
  1 at decay_begin to 0 at decay_end (`pgf_grads`)."""

  decay_begin: int = 0
  decay_end: int = 1000

  def grads(self, grads, params, mask, state, step):
    beta = linear_decay(step, self.decay_begin, self.decay_end)
    return jax.tree.map(lambda g, m: pgf_grads(g, m, beta), grads, mask.leaves)


@UPDATERS.register("group_lasso")
@dataclasses.dataclass(frozen=True)
class GroupLasso(Magnitude):
  """Group lasso then group pruning: gradient g + λ ∂/∂w Σ_g sqrt(|g|) ‖w_g‖₂ on "channel" and
  "block" leaves (`regularizers.group_lasso_grad`), pruning the smallest-norm groups to the
  schedule's sparsity (`magnitude_prune`; other leaves are pruned by magnitude, unpenalised).
  Wen et al. (2016), "Learning Structured Sparsity in Deep Neural Networks".
  """

  lam: float = 1e-4
  power = 2.0

  def grads(self, grads, params, mask, state, step):
    out = []
    for _, name, m, g, w in _leaves_with_structures(mask, grads, params):
      kind, kw = parse_structure(name)
      if kind in regularizers.GROUPS:
        penalty = regularizers.group_lasso_grad(jnp.where(m, w, 0), kind, **kw)
        g = g + self.lam * penalty.astype(g.dtype)
      out.append(jnp.where(m, g, jnp.zeros((), g.dtype)))
    return jax.tree.unflatten(jax.tree.structure(grads), out)


@UPDATERS.register("hypersparse")
@dataclasses.dataclass(frozen=True)
class HyperSparse(Magnitude):
  """ART with the HyperSparse regulariser, then global magnitude pruning on schedule steps.

  Gradient g + λ_t ∂L_HS/∂w over all sparse leaves jointly (`regularizers.hypersparse_grad`,
  κ = `sparsity`), λ_t = lam · eta^⌊t / epoch_steps⌋ growing each epoch.
  Glandorf, Kaiser & Rosenhahn (2023), "HyperSparse Neural Networks".
  """

  sparsity: float = 0.9
  lam: float = 5e-5
  eta: float = 1.05
  epoch_steps: int = 100
  scope: str = "global"

  def grads(self, grads, params, mask, state, step):
    items = _leaves_with_structures(mask, grads, params)
    sparse = [i for i, item in enumerate(items) if item[1] != DENSE]
    out = [g for _, _, _, g, _ in items]
    if sparse:
      flat_w = jnp.concatenate([jnp.where(items[i][2], items[i][4], 0).reshape(-1) for i in sparse])
      lam_t = self.lam * self.eta ** (jnp.asarray(step, jnp.float32) // self.epoch_steps)
      flat_g = lam_t * regularizers.hypersparse_grad(flat_w, self.sparsity)
      offset = 0
      for i in sparse:
        g = items[i][3]
        out[i] = g + flat_g[offset:offset + g.size].reshape(g.shape).astype(g.dtype)
        offset += g.size
    out = [jnp.where(item[2], g, jnp.zeros((), g.dtype)) for item, g in zip(items, out)]
    return jax.tree.unflatten(jax.tree.structure(grads), out)


def make_updater(name: str, **kwargs) -> Updater:
  """The updater registered as `name`, built from keyword arguments (the config entry point)."""
  return UPDATERS.get(name)(**kwargs)
