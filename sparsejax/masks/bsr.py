"""Block-sparse (BSR) trainable weights: only the kept blocks' values exist, and the blocks move.

W `[K, N]` is an `[R, C]` grid of `[bk, bn]` blocks (K = R bk, N = C bn). A `BsrWeight` stores
the Z kept blocks (Z static: shapes never change while the mask moves) as

  values_Zkn `[Z, bk, bn]`   the kept blocks' values, one slot per kept block
  slot_RC    `[R, C]` int32  z where block (r, c) is kept in slot z, -1 where it is not

so W[r bk:(r+1) bk, c bn:(c+1) bn] = values[slot[r, c]] where slot[r, c] >= 0, else 0, and the
block mask is slot >= 0. Updates are slot-stable: a kept block stays in its slot and a grown
block takes the slot of a dropped one (its values start at 0), so optimizer moments follow
their blocks without a permutation and only the swapped slots are reset. The matmul runs
`kernels.block_sparse` in forward and backward on a `BlockSchedule` built inside `jit` from
the slot map (`kernels.block_schedule.build_block_schedule_traced`).

  w = from_dense(w_KN, block_mask_RC)         # slots numbered in row-major order
  y_MN = bsr_matmul(x_MK, w)
  w_KN = to_dense(w)
  w, changed_Z = swap_blocks(w, grow_score_RC, n)   # drop n lowest ||block||_2, grow n

Training: `BlockSparseDense` (a Linen layer) and `BlockSparseFFN` (FFNS "block_sparse") hold
per kernel the params `blocks` (values), `slots` (the slot map, as float32 holding integers:
`jax.grad` takes the whole params tree and rejects int leaves) and `probe` (a float32 flag).
RigL grows blocks by the block norm of the dense gradient ||x_r^T dy_c||_2, which the backward
pass computes only when `probe` is 1 and hands over as the gradient of `slots`; `block_wrap`
(an optax wrapper) reads it, sets `probe` for the next step's schedule, and on schedule steps
drops and grows blocks (`swap_blocks`), zeroing the swapped slots' values and optimizer
moments. Checkpoints hold this compressed layout; `to_dense_params` exports dense kernels.
Gray, Radford & Kingma 2017 (block-sparse kernels); Mocanu et al. 2018 (SET); Evci et al.
2020, "Rigging the Lottery" (RigL), here on block scores.
"""
import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from kernels.block_schedule import BlockSchedule, build_block_schedule_traced
from kernels.block_sparse import block_sparse_matmul
from sparsejax.auxiliary import Aux, merge_aux, empty_aux
from sparsejax.masks.schedules import Schedule
from sparsejax.masks.updaters import drop_lowest, grow_highest, swap_count
from sparsejax.masks.wrap import reset_like_params
from sparsejax.registry import FFNS
from sparsejax.sites import Site

PyTree = Any
# Updaters of `block_wrap`: no change, magnitude drop + random growth, + dense-gradient growth.
BLOCK_UPDATERS = ("static", "set", "rigl")
# Param names of one block-sparse kernel in a Linen params tree.
BLOCKS, SLOTS, PROBE = "blocks", "slots", "probe"


@flax.struct.dataclass
class BsrWeight:
  """W `[R bk, C bn]` as its Z kept blocks `values_Zkn` and the slot map `slot_RC` (see module)."""

  values_Zkn: jax.Array
  slot_RC: jax.Array

  @property
  def num_blocks(self) -> int:
    return self.values_Zkn.shape[0]

  @property
  def grid_shape(self) -> tuple[int, int]:
    return tuple(self.slot_RC.shape)

  @property
  def block_shape(self) -> tuple[int, int]:
    return tuple(self.values_Zkn.shape[1:])

  def positions(self) -> tuple[jax.Array, jax.Array]:
    """(rows_Z, cols_Z): the grid position of the block in each slot."""
    return block_positions(self.slot_RC, self.num_blocks)


def block_positions(slot_RC: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
  """(rows_Z, cols_Z) with slot_RC[rows_Z[z], cols_Z[z]] == z, for a slot map of Z slots."""
  num_cols = slot_RC.shape[1]
  slot_X = jnp.asarray(slot_RC, jnp.int32).reshape(-1)
  flat_Z = jnp.zeros(num_blocks, jnp.int32).at[jnp.where(slot_X >= 0, slot_X, num_blocks)].set(
      jnp.arange(slot_X.size, dtype=jnp.int32), mode="drop")
  return flat_Z // num_cols, flat_Z % num_cols


def row_major_slots(block_mask_RC: jax.Array) -> jax.Array:
  """The slot map numbering the kept blocks of a bool mask in row-major order (-1 elsewhere)."""
  kept_X = jnp.asarray(block_mask_RC, bool).reshape(-1)
  slot_X = jnp.where(kept_X, jnp.cumsum(kept_X, dtype=jnp.int32) - 1, -1)
  return slot_X.reshape(block_mask_RC.shape)


def from_dense(w_KN: jax.Array, block_mask_RC: Any, num_blocks: int | None = None) -> BsrWeight:
  """The BSR weight of W's kept blocks (slots in row-major order); entries outside are dropped.

  `num_blocks` (the mask's count) is needed when the mask is traced.
  """
  if num_blocks is None:
    num_blocks = int(np.sum(np.asarray(block_mask_RC)))
  num_rows, num_cols = np.shape(block_mask_RC)
  if w_KN.ndim != 2 or w_KN.shape[0] % num_rows or w_KN.shape[1] % num_cols:
    raise ValueError(f"w must be 2-D and tiled by the {num_rows}x{num_cols} block grid, got "
                     f"shape {w_KN.shape}")
  bk, bn = w_KN.shape[0] // num_rows, w_KN.shape[1] // num_cols
  slot_RC = row_major_slots(block_mask_RC)
  rows_Z, cols_Z = block_positions(slot_RC, num_blocks)
  w_RCkn = w_KN.reshape(num_rows, bk, num_cols, bn).transpose(0, 2, 1, 3)
  return BsrWeight(values_Zkn=w_RCkn[rows_Z, cols_Z], slot_RC=slot_RC)


def to_dense(w: BsrWeight) -> jax.Array:
  """W `[R bk, C bn]`: each slot's values at its block, zeros elsewhere."""
  (num_rows, num_cols), (bk, bn) = w.grid_shape, w.block_shape
  rows_Z, cols_Z = w.positions()
  grid_RCkn = jnp.zeros((num_rows, num_cols, bk, bn), w.values_Zkn.dtype)
  grid_RCkn = grid_RCkn.at[rows_Z, cols_Z].set(w.values_Zkn)
  return grid_RCkn.transpose(0, 2, 1, 3).reshape(num_rows * bk, num_cols * bn)


def bsr_schedule(w: BsrWeight, capacity: int | None = None) -> BlockSchedule:
  """The `BlockSchedule` of W's slots (block z = slot z), built in jnp (jit-safe)."""
  rows_Z, cols_Z = w.positions()
  return build_block_schedule_traced(rows_Z, cols_Z, w.grid_shape, capacity)


def bsr_matmul(x_MK: jax.Array, w: BsrWeight, **kernel_kw) -> jax.Array:
  """y = x W through `kernels.block_sparse.block_sparse_matmul` (its kwargs pass through)."""
  return block_sparse_matmul(x_MK, w.values_Zkn, bsr_schedule(w), **kernel_kw)


def block_norms(w: BsrWeight) -> jax.Array:
  """`[R, C]` float32: ||values[slot[r, c]]||_2 at kept blocks, 0 elsewhere."""
  rows_Z, cols_Z = w.positions()
  norm_Z = jnp.sqrt(jnp.sum(jnp.square(w.values_Zkn.astype(jnp.float32)), axis=(1, 2)))
  return jnp.zeros(w.grid_shape, jnp.float32).at[rows_Z, cols_Z].set(norm_Z)


def dense_grad_block_norms(x_MK: jax.Array, dy_MN: jax.Array,
                           grid_shape: tuple[int, int]) -> jax.Array:
  """`[R, C]` float32: ||x[:, r]^T dy[:, c]||_2, the block norms of the dense gradient x^T dy."""
  num_rows, num_cols = grid_shape
  g_KN = lax.dot_general(x_MK, dy_MN, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
  g_RkCn = g_KN.reshape(num_rows, g_KN.shape[0] // num_rows, num_cols, g_KN.shape[1] // num_cols)
  return jnp.sqrt(jnp.sum(jnp.square(g_RkCn), axis=(1, 3)))


def swap_blocks(w: BsrWeight, grow_score_RC: jax.Array, n: Any) -> tuple[BsrWeight, jax.Array]:
  """Drop the n kept blocks of least ||block||_2, grow the n highest-score blocks not kept.

  m' = (m \\ argmin_n ||W_rc||_2) ∪ argmax_n(score over ¬m), ties to the lower row-major index
  (`sparsejax.masks.updaters`: a dropped block is never regrown in the same update). The i-th
  freed slot (ascending) takes the i-th grown block (row-major) with values 0; n may be traced
  and must not exceed min(Z, R C - Z) (`swap_count`). Returns (the new weight, changed_Z: the
  swapped slots).
  """
  num_blocks = w.num_blocks
  slot_RC = jnp.asarray(w.slot_RC, jnp.int32)
  kept_RC = slot_RC >= 0
  still_RC = drop_lowest(block_norms(w), kept_RC, n)
  grown_X = grow_highest(grow_score_RC, ~kept_RC, n).reshape(-1)
  freed_X = (kept_RC & ~still_RC).reshape(-1)
  freed_slots_X = jnp.sort(jnp.where(freed_X, slot_RC.reshape(-1), num_blocks))
  grown_rank_X = jnp.cumsum(grown_X, dtype=jnp.int32) - 1
  new_X = jnp.where(still_RC.reshape(-1), slot_RC.reshape(-1),
                    jnp.where(grown_X, freed_slots_X[grown_rank_X], -1))
  changed_Z = jnp.zeros(num_blocks, bool).at[jnp.where(freed_X, slot_RC.reshape(-1),
                                                       num_blocks)].set(True, mode="drop")
  values_Zkn = jnp.where(changed_Z[:, None, None], jnp.zeros((), w.values_Zkn.dtype), w.values_Zkn)
  return BsrWeight(values_Zkn=values_Zkn, slot_RC=new_X.reshape(slot_RC.shape)), changed_Z


# --------------------------------------------------------------------------- Linen layers


@jax.custom_vjp
def _grow_score_tap(y_MN, x_MK, slots_RC, probe):
  """y unchanged; backward: the gradient of `slots` is `dense_grad_block_norms(x, dy)` when
  probe > 0 (else 0), and x, probe get none through here."""
  del x_MK, slots_RC, probe
  return y_MN


def _tap_fwd(y_MN, x_MK, slots_RC, probe):
  return y_MN, (x_MK, slots_RC, probe)


def _tap_bwd(residuals, dy_MN):
  x_MK, slots_RC, probe = residuals
  scores_RC = lax.cond(probe > 0,
                       lambda: dense_grad_block_norms(x_MK, dy_MN, slots_RC.shape),
                       lambda: jnp.zeros(slots_RC.shape, jnp.float32))
  return dy_MN, jnp.zeros_like(x_MK), scores_RC.astype(slots_RC.dtype), jnp.zeros_like(probe)


_grow_score_tap.defvjp(_tap_fwd, _tap_bwd)


def _random_slots_init(num_blocks: int):
  """Init of `slots`: Z blocks drawn uniformly without replacement, slots in row-major order."""

  def init(key, shape, dtype=jnp.float32):
    score_X = jax.random.uniform(key, (int(np.prod(shape)),))
    keep_X = grow_highest(score_X, jnp.ones(score_X.shape, bool), num_blocks)
    return row_major_slots(keep_X.reshape(shape)).astype(dtype)

  return init


def _masked_lecun_init(num_rows: int) -> nn.initializers.Initializer:
  """Truncated normal of variance 1 / K for blocks `[Z, bk, bn]`: a dense LeCun-init kernel
  masked to its blocks (variance_scaling reads fan-in bk; the scale 1 / R makes it 1 / (R bk))."""
  return nn.initializers.variance_scaling(1.0 / num_rows, "fan_in", "truncated_normal",
                                          in_axis=-2, out_axis=-1, batch_axis=(0,))


def _block_shape(block: Any) -> tuple[int, int]:
  block = (block, block) if isinstance(block, int) else tuple(block)
  if len(block) != 2 or min(block) < 1:
    raise ValueError(f"block must be an int b or two positive ints (bk, bn), got {block}")
  return int(block[0]), int(block[1])


def num_kept_blocks(grid_shape: tuple[int, int], density: float) -> int:
  """Z = round(density R C), checked to lie in [1, R C]."""
  size = grid_shape[0] * grid_shape[1]
  num_blocks = int(round(density * size))
  if not 0 < density <= 1 or num_blocks < 1:
    raise ValueError(f"density={density} must be in (0, 1] and keep at least one of the {size} "
                     f"blocks")
  return num_blocks


class BlockSparseDense(nn.Module):
  """y = x W with W `[K, N]` kept on Z = round(density R C) moving `block`-sized blocks.

  Params (float32): `blocks` `[Z, bk, bn]` (logical axes (None, *axes)), `slots` `[R, C]` (the
  slot map, integers), `probe` `[]` (1: the backward hands RigL its growth scores as the
  gradient of `slots`). Init: Z blocks drawn uniformly (rng "params"), values truncated normal
  of variance 1 / K (a dense LeCun kernel masked), probe 1 so that step 0 has growth scores.
  `__call__(x [..., K]) -> (y [..., N], aux)`, aux metrics {"density": Z / (R C)}.
  """

  features: int
  block: Any = (128, 128)
  density: float = 0.1
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, Aux]:
    bk, bn = _block_shape(self.block)
    in_features = x.shape[-1]
    if in_features % bk or self.features % bn:
      raise ValueError(f"block {bk}x{bn} must tile the kernel [{in_features}, {self.features}]")
    grid_shape = (in_features // bk, self.features // bn)
    num_blocks = num_kept_blocks(grid_shape, self.density)
    param = lambda name, init, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    blocks_Zkn = param(BLOCKS, _masked_lecun_init(grid_shape[0]), (num_blocks, bk, bn),
                       (None, *self.axes))
    slots_RC = param(SLOTS, _random_slots_init(num_blocks), grid_shape, (None, None))
    probe = param(PROBE, nn.initializers.ones_init(), (), ())
    w = BsrWeight(values_Zkn=blocks_Zkn.astype(self.dtype), slot_RC=slots_RC.astype(jnp.int32))
    x_MK = x.reshape(-1, in_features).astype(self.dtype)
    y_MN = _grow_score_tap(bsr_matmul(x_MK, w, implementation=self.implementation), x_MK,
                           slots_RC, probe)
    aux = {"losses": {}, "metrics": {"density": jnp.asarray(num_blocks / np.prod(grid_shape),
                                                              jnp.float32)}}
    return y_MN.reshape(*x.shape[:-1], self.features), aux


@FFNS.register("block_sparse")
class BlockSparseFFN(nn.Module):
  """y = gelu(x W_in) W_out with W_in `[D, F]`, W_out `[F, D]` kept on moving blocks (BSR).

  Each kernel is a `BlockSparseDense` ("wi", "wo") of Z = round(density R C) blocks, trained
  through `kernels.block_sparse`; `block_wrap` (the LM task wires it to `config.sparsity`
  updater and schedule) moves the blocks. Sites "in", "hidden", "out" as `DenseFFN`.
  Gray, Radford & Kingma 2017, "GPU Kernels for Block-Sparse Weights".
  """

  d_model: int
  d_ff: int
  block: Any = (128, 128)
  density: float = 0.1
  dtype: Any = jnp.float32
  implementation: str = "auto"
  moves_blocks = True  # the task wraps the optimizer with `block_wrap`

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    dense = functools.partial(BlockSparseDense, block=self.block, density=self.density,
                              dtype=self.dtype, implementation=self.implementation)
    x_BTD = Site(name="in")(x_BTD.astype(self.dtype))
    h_BTF, wi_aux = dense(self.d_ff, axes=("embed", "mlp"), name="wi")(x_BTD)
    h_BTF = Site(name="hidden")(nn.gelu(h_BTF, approximate=True))
    y_BTD, wo_aux = dense(self.d_model, axes=("mlp", "embed"), name="wo")(h_BTF)
    return Site(name="out")(y_BTD), merge_aux("wo", wo_aux, merge_aux("wi", wi_aux, empty_aux()))


# ------------------------------------------------------------------------ params and optax


def _kernel_leaves(params: PyTree) -> list[tuple[int, int, int]]:
  """(blocks, slots, probe) leaf indices (in `jax.tree.leaves` order) of every block-sparse
  kernel: each dict holding the three names."""
  index = {tuple(path): i for i, (path, _) in
           enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
  found = []
  for path, i in index.items():
    if getattr(path[-1], "key", None) == SLOTS:
      parent = path[:-1]
      names = [index.get(parent + (jax.tree_util.DictKey(n),)) for n in (BLOCKS, SLOTS, PROBE)]
      if None not in names:
        found.append(tuple(names))
  return sorted(found)


def to_dense_params(params: PyTree) -> PyTree:
  """`params` with each block-sparse kernel's {blocks, slots, probe} replaced by its dense
  `[K, N]` kernel (the `DenseFFN` layout, for inspection and export)."""
  if not isinstance(params, Mapping):
    return params
  if {BLOCKS, SLOTS, PROBE} <= set(params):
    return to_dense(BsrWeight(values_Zkn=params[BLOCKS],
                              slot_RC=jnp.asarray(params[SLOTS], jnp.int32)))
  return {k: to_dense_params(v) for k, v in params.items()}


class BlockWrapState(NamedTuple):
  """State of `block_wrap`: the step, a PRNG key (raw uint32[2]) and the inner optimizer's state."""

  step: jax.Array
  key: jax.Array
  inner: optax.OptState


def block_wrap(tx: optax.GradientTransformation, updater: str = "static",
               schedule: Schedule | None = None, seed: int = 0) -> optax.GradientTransformation:
  """`tx` on the block-sparse kernels' values; their blocks move by `updater` on `schedule`.

  Every step: the gradients of `slots` (RigL growth scores) and `probe` are withheld from `tx`
  (nor is global-norm clipping fed them), `slots` stay put, `probe` becomes 1 iff the next step
  is a "rigl" update step. On schedule steps (value = drop fraction f) each kernel swaps
  n = min(round(f Z), R C - Z) blocks (`swap_blocks`) at the post-step values, growing by
  uniform random scores ("set", key fold_in(fold_in(key, step), kernel)) or this step's dense
  gradient block norms ("rigl"); swapped slots end at exactly 0 and every inner-state leaf
  shaped like a param (Adam mu / nu) is zeroed there. `tx.update` must be given params.
  A norm over the whole gradient (the trainer's logged grad_norm) includes the growth scores
  on probe steps, and one over the updates the slot moves on swap steps.
  """
  if updater not in BLOCK_UPDATERS:
    raise ValueError(f"block updater {updater!r}; allowed: {', '.join(BLOCK_UPDATERS)}")
  if schedule is not None and schedule.quantity != "drop_fraction":
    raise ValueError(f"block updates read a drop_fraction schedule, got {schedule!r}")
  moves = schedule is not None and updater != "static"

  def init_fn(params):
    return BlockWrapState(step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(seed),
                          inner=tx.init(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("block_wrap needs params: call tx.update(grads, state, params)")
    kernels = _kernel_leaves(params)
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(grads)
    scores = [g_leaves[s] for _, s, _ in kernels]
    for _, s, p in kernels:
      g_leaves[s], g_leaves[p] = jnp.zeros_like(g_leaves[s]), jnp.zeros_like(g_leaves[p])
    updates, inner = tx.update(jax.tree.unflatten(treedef, g_leaves), state.inner, params)
    u_leaves = jax.tree.leaves(updates)
    probe_next = (jnp.asarray(schedule(state.step + 1)[1], jnp.float32)
                  if moves and updater == "rigl" else jnp.zeros((), jnp.float32))
    for _, s, p in kernels:
      u_leaves[s] = jnp.zeros_like(p_leaves[s])
      u_leaves[p] = (probe_next - p_leaves[p]).astype(p_leaves[p].dtype)

    def swap(operands):
      u_leaves, inner = operands
      u_leaves, changed = list(u_leaves), [jnp.zeros(jnp.shape(x), bool) for x in p_leaves]
      for k, (b, s, _) in enumerate(kernels):
        w = BsrWeight(values_Zkn=p_leaves[b] + u_leaves[b],
                      slot_RC=jnp.asarray(p_leaves[s], jnp.int32))
        grow_RC = (scores[k] if updater == "rigl" else jax.random.uniform(
            jax.random.fold_in(jax.random.fold_in(state.key, state.step), k), w.grid_shape))
        new, changed_Z = swap_blocks(w, grow_RC, swap_count(value, w.slot_RC >= 0))
        changed[b] = jnp.broadcast_to(changed_Z[:, None, None], p_leaves[b].shape)
        u_leaves[b] = jnp.where(changed[b], -p_leaves[b], u_leaves[b])
        u_leaves[s] = new.slot_RC.astype(p_leaves[s].dtype) - p_leaves[s]
      inner = reset_like_params(inner, params, jax.tree.unflatten(treedef, changed))
      return u_leaves, inner

    if moves:
      value, now = schedule(state.step)
      u_leaves, inner = lax.cond(now, swap, lambda operands: operands, (u_leaves, inner))
    new_state = BlockWrapState(step=state.step + 1, key=state.key, inner=inner)
    return jax.tree.unflatten(treedef, u_leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)
