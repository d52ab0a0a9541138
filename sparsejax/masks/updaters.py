"""Mask updaters: pruning, dynamic sparse training (SET, RigL, SRigL, sparse momentum), N:M
training (SR-STE, progressive gradient flow) and regularisation-based pruning.

Two layers, as everywhere in sparsejax:

1. Pure per-leaf functions on arrays, jit-safe with traced counts (a count may be a Python int
   or a traced int32 scalar, so a schedule's value can drive it inside `jit`):
     `drop_lowest`, `grow_highest`, `set_update`, `rigl_update`, `srigl_update`,
     `magnitude_prune`, `sparse_momentum_update`, `nm_mask`, `srste_grads`, `pgf_grads`.
   Selections rank with a stable sort: among equal scores the lower flat index wins.
2. `Updater` objects (registered in `UPDATERS`) that `sparsejax.masks.wrap` drives. Every hook
   takes one `UpdateInputs` (params, mask, grads, state, step, value, key; fields a hook cannot
   have yet are None) and returns one named thing:
     init(inputs) -> state                 updater state, a pytree
     initial_mask(inputs) -> Mask          e.g. N:M of the initial weights
     observe(inputs) -> state              every step (momentum, active counts)
     grads(inputs) -> grads                every step: the gradient fed to the inner optimizer
     update(inputs) -> MaskUpdate          on schedule steps: the new mask and state
   `check(mask)` rejects initial masks whose structures the updater cannot handle.
   `consumes` names the schedule value an updater reads ("sparsity", "drop_fraction" or None);
   `dense_weights` is True when masked weights keep training (SR-STE, PGF): the forward pass
   must then use `mask.apply(params)`. Per-leaf logic reads `leaf_inputs(inputs)`: one
   `LeafInputs` (path, structure, m, w, g, key) per parameter.

Growth never picks a position that was active before the drop, so the positions that change
are exactly the dropped ones plus the grown ones, and for SET / RigL / SRigL |grown| == |dropped|.
Kernel axes follow `sparsejax.masks.mask`: inputs on axis -2, outputs on axis -1; the constant
fan-in structure ("fan_in") keeps the same count per output neuron (per column).
"""
import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.masks import regularizers
from sparsejax.masks.mask import DENSE, Mask, leaves_by_path
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


@flax.struct.dataclass
class UpdateInputs:
  """What every updater hook is called with.

  Attributes:
    params: the weights; on schedule steps (`update`), those after this step's update.
    mask: the current `Mask`, mirroring params (boxed where params are, see `Mask.mirroring`).
    grads: this step's dense gradient, like params (None in `init` and `initial_mask`).
    state: the updater state from `init` (None in `init` and `initial_mask`).
    step: the step number (an int32 scalar under `wrap`).
    value: on schedule steps, the schedule's value (the quantity the updater `consumes`).
    key: on schedule steps, a PRNG key for this step.
  """

  params: PyTree
  mask: Mask
  grads: PyTree = None
  state: PyTree = None
  step: Any = 0
  value: Any = None
  key: jax.Array | None = None


@flax.struct.dataclass
class MaskUpdate:
  """What `Updater.update` returns: the new mask and the new updater state."""

  mask: Mask
  state: PyTree


@dataclasses.dataclass(frozen=True)
class LeafInputs:
  """One parameter of an `UpdateInputs`: path, structure name, mask m, weights w, dense gradient g
  (None without grads) and PRNG key (None without a key; leaf i's stream is fold_in(key, i))."""

  path: str
  structure: str
  m: jax.Array
  w: jax.Array
  g: jax.Array | None
  key: jax.Array | None

  @property
  def sparse(self) -> bool:
    return self.structure != DENSE

  @property
  def axis(self) -> int | None:
    """-2 (counts per output neuron) for a "fan_in" leaf, None (per leaf) otherwise."""
    return -2 if structure_kind(self.structure) == "fan_in" else None


def leaf_inputs(inputs: UpdateInputs) -> list[LeafInputs]:
  """One `LeafInputs` per parameter, in leaf order."""
  ws = jax.tree.leaves(inputs.params)
  gs = [None] * len(ws) if inputs.grads is None else jax.tree.leaves(inputs.grads)
  return [LeafInputs(path=path, structure=name, m=m, w=w, g=g,
                     key=None if inputs.key is None else jax.random.fold_in(inputs.key, i))
          for i, ((path, name), m, w, g) in enumerate(
              zip(inputs.mask.structures, jax.tree.leaves(inputs.mask.leaves), ws, gs,
                  strict=True))]


def _with_leaves(mask: Mask, new_leaves: list[jax.Array]) -> Mask:
  return mask.replace_leaves(jax.tree.unflatten(jax.tree.structure(mask.leaves), new_leaves))


def _mask_update(inputs: UpdateInputs, new_leaves: list[jax.Array]) -> MaskUpdate:
  """The mask with `new_leaves` (in leaf order), the updater state unchanged."""
  return MaskUpdate(mask=_with_leaves(inputs.mask, new_leaves), state=inputs.state)


def _like_grads(inputs: UpdateInputs, new_leaves: list[jax.Array]) -> PyTree:
  return jax.tree.unflatten(jax.tree.structure(inputs.grads), new_leaves)


def _masked(g: jax.Array, m: jax.Array) -> jax.Array:
  return jnp.where(m, g, jnp.zeros((), g.dtype))


def _full_like_params(params: PyTree, dtype) -> PyTree:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


def _split(flat: jax.Array, like: Sequence[jax.Array]) -> list[jax.Array]:
  """`flat` cut into arrays shaped like `like`: the inverse of concatenating their ravels."""
  ends = np.cumsum([x.size for x in like])
  return [flat[end - x.size:end].reshape(x.shape) for end, x in zip(ends, like)]


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

  def init(self, inputs: UpdateInputs) -> PyTree:
    return {}

  def initial_mask(self, inputs: UpdateInputs) -> Mask:
    return inputs.mask

  def observe(self, inputs: UpdateInputs) -> PyTree:
    return inputs.state

  def grads(self, inputs: UpdateInputs) -> PyTree:
    return jax.tree.map(_masked, inputs.grads, inputs.mask.leaves)

  def update(self, inputs: UpdateInputs) -> MaskUpdate:
    return MaskUpdate(mask=inputs.mask, state=inputs.state)


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

  def update(self, inputs):
    leaves = leaf_inputs(inputs)
    if self.scope == "global":
      return _mask_update(inputs, _global_magnitude(leaves, 1.0 - inputs.value))
    densities = self.leaf_densities(inputs.mask, inputs.value)
    return _mask_update(inputs, [
        magnitude_prune(leaf.w, leaf.m, densities[leaf.path], leaf.structure, self.power)
        if leaf.sparse else leaf.m for leaf in leaves])


def _global_magnitude(leaves: list[LeafInputs], density) -> list[jax.Array]:
  """One |w| ranking over every sparse leaf; keeps round(density · Σ sizes) in total."""
  sparse = [leaf for leaf in leaves if leaf.sparse]
  if not sparse:
    return [leaf.m for leaf in leaves]
  flat_m = jnp.concatenate([leaf.m.reshape(-1) for leaf in sparse])
  flat_w = jnp.concatenate([leaf.w.reshape(-1).astype(jnp.float32) for leaf in sparse])
  n_drop = jnp.maximum(jnp.sum(flat_m, dtype=jnp.int32) - _round_count(density, flat_m.size), 0)
  kept = _split(drop_lowest(jnp.abs(flat_w), flat_m, n_drop), [leaf.m for leaf in sparse])
  by_path = {leaf.path: m for leaf, m in zip(sparse, kept)}
  return [by_path.get(leaf.path, leaf.m) for leaf in leaves]


@dataclasses.dataclass(frozen=True)
class _Swap(Updater):
  """Drop-and-grow at a constant per-leaf count (per neuron for "fan_in" leaves)."""

  consumes = "drop_fraction"

  def check(self, mask):
    _check_structures(mask, SWAP_STRUCTURES, type(self).__name__)

  def swap_leaf(self, leaf: LeafInputs, inputs: UpdateInputs) -> jax.Array:
    """The new mask of one sparse leaf."""
    raise NotImplementedError

  def update(self, inputs):
    return _mask_update(inputs, [self.swap_leaf(leaf, inputs) if leaf.sparse else leaf.m
                                 for leaf in leaf_inputs(inputs)])


@UPDATERS.register("set")
@dataclasses.dataclass(frozen=True)
class SET(_Swap):
  """SET: magnitude drop, uniform random regrowth (`set_update`)."""

  def swap_leaf(self, leaf, inputs):
    n_swap = swap_count(inputs.value, leaf.m, leaf.axis)
    return set_update(leaf.w, leaf.m, n_swap, leaf.key, leaf.axis)


@UPDATERS.register("rigl")
@dataclasses.dataclass(frozen=True)
class RigL(_Swap):
  """RigL: magnitude drop, gradient regrowth (`rigl_update`).

  exploration > 0 adds the DST-EE bonus c · sqrt(ln(t + 1) / (N + 1)) to |g|, N counting the
  steps each weight has been active (kept in the updater state).
  """

  exploration: float = 0.0

  def init(self, inputs):
    if self.exploration > 0:
      return {"active_steps": _full_like_params(inputs.params, jnp.int32)}
    return {}

  def observe(self, inputs):
    if self.exploration <= 0:
      return inputs.state
    active_steps = jax.tree.map(lambda n, m: n + m.astype(jnp.int32),
                                inputs.state["active_steps"], inputs.mask.leaves)
    return dict(inputs.state, active_steps=active_steps)

  def bonus(self, leaf: LeafInputs, inputs: UpdateInputs) -> jax.Array | None:
    if self.exploration <= 0:
      return None
    active_steps = leaves_by_path(inputs.state["active_steps"])[leaf.path]
    return exploration_bonus(active_steps, inputs.step, self.exploration)

  def swap_leaf(self, leaf, inputs):
    n_swap = swap_count(inputs.value, leaf.m, leaf.axis)
    return rigl_update(leaf.w, leaf.g, leaf.m, n_swap, self.bonus(leaf, inputs), leaf.axis)


@UPDATERS.register("srigl")
@dataclasses.dataclass(frozen=True)
class SRigL(RigL):
  """SRigL: `srigl_update` on "fan_in" leaves (constant fan-in, neuron ablation when a neuron's
  salient fan-in falls below gamma_sal · k; gamma_sal = 0 turns ablation off), RigL elsewhere.
  The per-leaf kept count at init is the target the fan-in is re-derived from after ablation."""

  gamma_sal: float = 0.3

  def init(self, inputs):
    mask = inputs.mask
    target_nnz = {path: jnp.sum(m, dtype=jnp.int32) for path, m in mask.flat().items()
                  if structure_kind(mask.structure_of(path)) == "fan_in"}
    return dict(super().init(inputs), target_nnz=target_nnz)

  def swap_leaf(self, leaf, inputs):
    if leaf.axis is None:
      return super().swap_leaf(leaf, inputs)
    return srigl_update(leaf.w, leaf.g, leaf.m, inputs.value, inputs.state["target_nnz"][leaf.path],
                        self.gamma_sal, self.bonus(leaf, inputs))


@UPDATERS.register("sparse_momentum")
@dataclasses.dataclass(frozen=True)
class SparseMomentum(Updater):
  """Sparse momentum (`sparse_momentum_update`) over all unstructured sparse leaves, with its
  own momentum buffer mom ← β mom + g of the dense gradients."""

  beta: float = 0.9
  consumes = "drop_fraction"

  def check(self, mask):
    _check_structures(mask, ("unstructured",), "SparseMomentum")

  def init(self, inputs):
    return {"momentum": _full_like_params(inputs.params, jnp.float32)}

  def observe(self, inputs):
    momentum = jax.tree.map(lambda v, g: self.beta * v + g.astype(jnp.float32),
                            inputs.state["momentum"], inputs.grads)
    return dict(inputs.state, momentum=momentum)

  def update(self, inputs):
    leaves = leaf_inputs(inputs)
    sparse = [leaf for leaf in leaves if leaf.sparse]
    momentum = leaves_by_path(inputs.state["momentum"])
    grown = sparse_momentum_update([leaf.w for leaf in sparse],
                                   [momentum[leaf.path] for leaf in sparse],
                                   [leaf.m for leaf in sparse], inputs.value)
    by_path = {leaf.path: m for leaf, m in zip(sparse, grown)}
    return _mask_update(inputs, [by_path.get(leaf.path, leaf.m) for leaf in leaves])


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

  def nm_leaves(self, inputs: UpdateInputs) -> list[jax.Array]:
    return [nm_mask(leaf.w, **parse_structure(leaf.structure)[1]) if leaf.sparse else leaf.m
            for leaf in leaf_inputs(inputs)]

  def initial_mask(self, inputs):
    return _with_leaves(inputs.mask, self.nm_leaves(inputs))

  def update(self, inputs):
    return _mask_update(inputs, self.nm_leaves(inputs))


@UPDATERS.register("nm_srste")
@dataclasses.dataclass(frozen=True)
class NMSRSTE(_NM):
  """N:M with SR-STE: the gradient for the dense weights is `srste_grads` (λ_W = lam)."""

  lam: float = 2e-4

  def grads(self, inputs):
    return jax.tree.map(lambda g, w, m: srste_grads(g, w, m, self.lam), inputs.grads,
                        inputs.params, inputs.mask.leaves)


@UPDATERS.register("nm_pgf")
@dataclasses.dataclass(frozen=True)
class NMPGF(_NM):
  """N:M with progressive gradient flow: pruned weights get g · β_t, β_t decaying linearly from
  1 at decay_begin to 0 at decay_end (`pgf_grads`)."""

  decay_begin: int = 0
  decay_end: int = 1000

  def grads(self, inputs):
    beta = linear_decay(inputs.step, self.decay_begin, self.decay_end)
    return jax.tree.map(lambda g, m: pgf_grads(g, m, beta), inputs.grads, inputs.mask.leaves)


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

  def penalised(self, leaf: LeafInputs) -> jax.Array:
    """g + λ ∂/∂w of the group lasso of the kept weights, for "channel" / "block" leaves."""
    kind, kw = parse_structure(leaf.structure)
    if kind not in regularizers.GROUPS:
      return leaf.g
    penalty = regularizers.group_lasso_grad(jnp.where(leaf.m, leaf.w, 0), kind, **kw)
    return leaf.g + self.lam * penalty.astype(leaf.g.dtype)

  def grads(self, inputs):
    return _like_grads(inputs, [_masked(self.penalised(leaf), leaf.m)
                                for leaf in leaf_inputs(inputs)])


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

  def penalised(self, sparse: list[LeafInputs], step) -> list[jax.Array]:
    """g + λ_t ∂L_HS/∂w for each of the `sparse` leaves, L_HS taken over their kept weights."""
    if not sparse:
      return []
    flat_w = jnp.concatenate([jnp.where(leaf.m, leaf.w, 0).reshape(-1) for leaf in sparse])
    lam_t = self.lam * self.eta ** (jnp.asarray(step, jnp.float32) // self.epoch_steps)
    penalties = _split(lam_t * regularizers.hypersparse_grad(flat_w, self.sparsity),
                       [leaf.g for leaf in sparse])
    return [leaf.g + penalty.astype(leaf.g.dtype) for leaf, penalty in zip(sparse, penalties)]

  def grads(self, inputs):
    leaves = leaf_inputs(inputs)
    sparse = [leaf for leaf in leaves if leaf.sparse]
    penalised = dict(zip([leaf.path for leaf in sparse], self.penalised(sparse, inputs.step)))
    return _like_grads(inputs, [_masked(penalised.get(leaf.path, leaf.g), leaf.m)
                                for leaf in leaves])


def make_updater(name: str, **kwargs) -> Updater:
  """The updater registered as `name`, built from keyword arguments (the config entry point)."""
  return UPDATERS.get(name)(**kwargs)
