"""Grouped matmul on an expert-sorted row layout: the compute core of dropless MoE.

Rows of `x_MD` are sorted by group: rows [start_e, start_e + size_e) belong to group e. The
XLA fallback here walks row tiles with `while_loop`s whose trip counts are the numbers of tiles
actually used, so it never pays E times the dense FLOPs (as `jax.lax.ragged_dot`'s CPU lowering
does) and never copies a weight matrix per tile into memory.

Tile sizes halve from `tile` down to `min_tile`, one loop per size: each group first takes as
many full `tile`-row tiles as fit, then at most one tile of each smaller size, and ends with a
partial `min_tile` tile. Big tiles keep the matmuls efficient, small ones bound the padding
waste to < `min_tile` rows per group. A tile's window may overlap its neighbours' rows, but
only rows of its own group are written (read-modify-write of the output window), so tiles may
run in any order.

A Pallas kernel can replace `grouped_matmul` behind the same signature; gradients go through an
explicit `custom_vjp` as DESIGN.md asks of kernels.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class TileSchedule:
  """Row tiles of one size: tile n multiplies rows [lo_N[n], hi_N[n]) by group expert_N[n].

  Only the first `num_tiles` entries are used; the arrays have the static length
  min(M, ceil(M / tile) + E), an upper bound on the tiles of any phase. When `full`, every tile
  holds exactly `tile` rows of its group, so no row mask is needed.
  """
  expert_N: jax.Array
  lo_N: jax.Array
  hi_N: jax.Array
  num_tiles: jax.Array
  tile: int = flax.struct.field(pytree_node=False)
  full: bool = flax.struct.field(pytree_node=False)


def tile_sizes(num_rows: int, tile: int, min_tile: int) -> tuple[int, ...]:
  """The tile sizes tile, tile // 2, ..., min_tile, each capped at num_rows, descending."""
  sizes = [tile]
  while sizes[-1] > min_tile:
    sizes.append(max(sizes[-1] // 2, min_tile))
  return tuple(sorted({min(size, num_rows) for size in sizes}, reverse=True))


def make_tile_schedules(group_sizes_E: jax.Array, num_rows: int, tile: int,
                        min_tile: int) -> tuple[TileSchedule, ...]:
  """Cover every group's rows exactly once with tiles of the sizes `tile_sizes(...)`.

  With r_e rows of group e left, a phase of size t takes floor(r_e / t) full tiles, the last
  (smallest) phase ceil(r_e / t) tiles, the final one cut at the group's end.
  """
  num_groups = group_sizes_E.shape[0]
  sizes = tile_sizes(num_rows, tile, min_tile)
  ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  next_E = ends_E - group_sizes_E.astype(jnp.int32)
  schedules = []
  for phase, size in enumerate(sizes):
    full = phase < len(sizes) - 1
    left_E = ends_E - next_E
    count_E = left_E // size if full else -(-left_E // size)
    count_ends_E = jnp.cumsum(count_E)
    n_N = jnp.arange(min(num_rows, -(-num_rows // size) + num_groups), dtype=jnp.int32)
    expert_N = jnp.minimum(jnp.searchsorted(count_ends_E, n_N, side="right"), num_groups - 1)
    lo_N = next_E[expert_N] + (n_N - (count_ends_E - count_E)[expert_N]) * size
    schedules.append(TileSchedule(
        expert_N=expert_N.astype(jnp.int32), lo_N=lo_N,
        hi_N=jnp.minimum(lo_N + size, ends_E[expert_N]), num_tiles=count_ends_E[-1],
        tile=size, full=full))
    next_E = jnp.minimum(next_E + count_E * size, ends_E)
  return tuple(schedules)


def _tile_window(schedule: TileSchedule, n: jax.Array, num_rows: int):
  """Window start of tile n (clamped inside the array) and the mask of its own rows."""
  lo, hi = schedule.lo_N[n], schedule.hi_N[n]
  start = jnp.minimum(lo, num_rows - schedule.tile)
  rows = start + jnp.arange(schedule.tile, dtype=jnp.int32)
  return start, (rows >= lo) & (rows < hi)


def _gmm_loops(x_MD: jax.Array, w_EDF: jax.Array, schedules: tuple[TileSchedule, ...],
               transpose_w: bool) -> jax.Array:
  """y[m] = x[m] @ w[e(m)] (or @ w[e(m)].T); rows outside every group are 0."""
  num_rows = x_MD.shape[0]
  out_dim = w_EDF.shape[1] if transpose_w else w_EDF.shape[2]
  w_contract = 1 if transpose_w else 0
  y_MF = jnp.zeros((num_rows, out_dim), x_MD.dtype)
  for schedule in schedules:

    def body(n, y_MF, schedule=schedule):
      start, mask_R = _tile_window(schedule, n, num_rows)
      x_RD = lax.dynamic_slice_in_dim(x_MD, start, schedule.tile)
      w_DF = lax.dynamic_index_in_dim(w_EDF, schedule.expert_N[n], keepdims=False)
      r_RF = lax.dot_general(x_RD, w_DF, (((1,), (w_contract,)), ((), ())),
                             preferred_element_type=jnp.float32)
      new_RF = r_RF.astype(y_MF.dtype)
      if not schedule.full:
        old_RF = lax.dynamic_slice_in_dim(y_MF, start, schedule.tile)
        new_RF = jnp.where(mask_R[:, None], new_RF, old_RF)
      return lax.dynamic_update_slice_in_dim(y_MF, new_RF, start, axis=0)

    y_MF = lax.fori_loop(0, schedule.num_tiles, body, y_MF)
  return y_MF


def _tgmm_loops(x_MD: jax.Array, dy_MF: jax.Array, schedules: tuple[TileSchedule, ...],
                num_groups: int) -> jax.Array:
  """dw[e] = sum over rows m of group e of outer(x[m], dy[m]), float32 `[E, D, F]`."""
  num_rows = x_MD.shape[0]
  dw_EDF = jnp.zeros((num_groups, x_MD.shape[1], dy_MF.shape[1]), jnp.float32)
  for schedule in schedules:

    def body(n, dw_EDF, schedule=schedule):
      start, mask_R = _tile_window(schedule, n, num_rows)
      x_RD = lax.dynamic_slice_in_dim(x_MD, start, schedule.tile)
      if not schedule.full:
        x_RD = jnp.where(mask_R[:, None], x_RD, 0)
      dy_RF = lax.dynamic_slice_in_dim(dy_MF, start, schedule.tile)
      g_DF = lax.dot_general(x_RD, dy_RF, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
      e = schedule.expert_N[n]
      old_DF = lax.dynamic_index_in_dim(dw_EDF, e, keepdims=False)
      return lax.dynamic_update_index_in_dim(dw_EDF, old_DF + g_DF, e, axis=0)

    dw_EDF = lax.fori_loop(0, schedule.num_tiles, body, dw_EDF)
  return dw_EDF


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x_MD, w_EDF, group_sizes_E, tile, min_tile):
  schedules = make_tile_schedules(group_sizes_E, x_MD.shape[0], tile, min_tile)
  return _gmm_loops(x_MD, w_EDF, schedules, transpose_w=False)


def _grouped_matmul_fwd(x_MD, w_EDF, group_sizes_E, tile, min_tile):
  schedules = make_tile_schedules(group_sizes_E, x_MD.shape[0], tile, min_tile)
  return _gmm_loops(x_MD, w_EDF, schedules, transpose_w=False), (x_MD, w_EDF, schedules)


def _grouped_matmul_bwd(tile, min_tile, residuals, dy_MF):
  del tile, min_tile  # Baked into the schedules.
  x_MD, w_EDF, schedules = residuals
  dx_MD = _gmm_loops(dy_MF, w_EDF, schedules, transpose_w=True)
  dw_EDF = _tgmm_loops(x_MD, dy_MF, schedules, w_EDF.shape[0])
  return dx_MD, dw_EDF.astype(w_EDF.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *,
                   tile: int = 256, min_tile: int = 16) -> jax.Array:
  """Per-group matmul on a group-sorted layout: y[m] = x[m] @ w[e(m)].

  e(m) is the group holding row m: groups own consecutive rows, group e has group_sizes_E[e] of
  them, starting at sum_{e' < e} group_sizes_E[e']. Rows past sum(group_sizes_E) give 0. Same
  contract as `jax.lax.ragged_dot` and MegaBlocks' grouped GEMM (Gale et al., 2023).

  Args:
    x_MD: `[M, D]` rows sorted by group.
    w_EDF: `[E, D, F]` one weight matrix per group, same dtype as x_MD.
    group_sizes_E: int `[E]`, non-negative, summing to at most M.
    tile: largest row tile (static); tiles halve down to `min_tile`.
    min_tile: smallest row tile (at most `tile`); fewer than min_tile padding rows per group
      are computed.

  Returns:
    `[M, F]` in x_MD's dtype, accumulated in float32.
  """
  if x_MD.ndim != 2 or w_EDF.ndim != 3 or x_MD.shape[1] != w_EDF.shape[1]:
    raise ValueError(f"grouped_matmul needs x [M, D] and w [E, D, F], got x {x_MD.shape} and "
                     f"w {w_EDF.shape}")
  if group_sizes_E.shape != (w_EDF.shape[0],):
    raise ValueError(f"group_sizes must have shape ({w_EDF.shape[0]},), got "
                     f"{group_sizes_E.shape}")
  if tile < 1 or min_tile < 1:
    raise ValueError(f"tile and min_tile must be >= 1, got tile={tile}, min_tile={min_tile}")
  if x_MD.shape[0] == 0:
    return jnp.zeros((0, w_EDF.shape[2]), x_MD.dtype)
  return _grouped_matmul(x_MD, w_EDF, group_sizes_E, tile, min(min_tile, tile))
