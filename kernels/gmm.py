"""Grouped matmul `gmm` and its transpose `tgmm` on a group-sorted row layout (dropless MoE).

Rows are sorted by group: group g owns rows [start_g, end_g) with end_g = min(M, sizes_0 + ... +
sizes_g) and start_g = end_{g-1}; sizes may be zero, rows past sum(sizes) belong to no group.

  gmm:  y[m]  = lhs[m] rhs[g(m)]                       y `[M, N]`, 0 for rows in no group
  tgmm: dw[g] = sum_{m in group g} lhs[m]^T grad[m]    dw `[G, K, N]` (gmm's weight gradient)

Backends (chosen by `implementation`, see `kernels.backend`):

  reference   dense: every row times every group's weight, masked (G times the FLOPs; what
              `jax.lax.ragged_dot` costs on CPU).
  xla         a loop over groups: one `[tm, K] x [K, N]` matmul per whole row tile of the group,
              then one for the rest (< tm rows) in the smallest window that holds it, its size
              picked by `lax.switch` from a static ladder 16, 20, 24, 28, 32, 40, ... up to tm
              (`xla_window_sizes`). At most 1.25 M + 16 G rows are computed, never G M, in few,
              large matmuls; tgmm sums a group's matmuls in float32 and stores dw[g] once.
  pallas tpu  the MegaBlocks kernel: a fixed grid (N tiles, steps, K tiles), steps listed by
              `make_group_tiles` and passed as scalar prefetch; an output tile shared by groups is
              revisited on consecutive steps, each writing its own rows.
  pallas gpu  Triton: grid (M tiles, N tiles), each program loops over the groups overlapping its
              row tile (GPU programs run concurrently, so a tile has one writer).

Gradients go through `jax.custom_vjp`: for y = gmm(x, w), dx = gmm(dy, w^T) and dw = tgmm(x, dy);
for dw = tgmm(x, g), dx = gmm(g, ct^T) and dg = gmm(x, ct). Inputs of any size are padded to the
tiles inside; accumulation is float32, outputs have the inputs' dtype.
Gale et al. 2023, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts".
"""
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from kernels import backend as backend_lib

Tiling = tuple[int, int, int]
DEFAULT_TILING: Tiling = (128, 128, 128)
_TPU_ALIGN = (16, 128, 128)  # (sublane, lane, lane) multiples a TPU block dim needs
_GPU_MIN_TILE = 16  # smallest tile a Triton dot accepts
_XLA_MIN_WINDOW = 16  # smallest row window of the XLA loop below its tile


class GroupTiles(NamedTuple):
  """The steps of a grouped matmul over row tiles of `tile` rows.

  Step s < num_steps works on rows [tile_S[s] tile, (tile_S[s] + 1) tile) for group group_S[s],
  which owns rows [starts_G[g], ends_G[g]). Steps are sorted by group and hence by tile, so a
  tile shared by several groups is visited on consecutive steps. There are S = tiles + groups - 1
  steps; those past num_steps repeat the last one.
  """
  group_S: jax.Array
  tile_S: jax.Array
  num_steps: jax.Array
  starts_G: jax.Array
  ends_G: jax.Array


def group_bounds(group_sizes_G: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """(starts_G, ends_G): group g owns rows [starts_G[g], ends_G[g]), cut at num_rows."""
  ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), num_rows)
  starts_G = jnp.concatenate([jnp.zeros(1, jnp.int32), ends_G[:-1]])
  return starts_G, ends_G


def make_group_tiles(group_sizes_G: jax.Array, num_rows: int, tile: int, *,
                     visit_empty_groups: bool, tail_group: bool) -> GroupTiles:
  """The (tile, group) steps covering every group's rows, with static shapes.

  Group g takes the tiles from start_g // tile to (end_g - 1) // tile. With `visit_empty_groups`
  an empty group takes one step (tgmm writes its zeros there). With `tail_group` the rows past
  the groups, up to the last tile's end, form one more group G (gmm writes their zeros).
  Consecutive groups share at most one tile, so tiles + groups - 1 steps always suffice.
  """
  num_tiles = pl.cdiv(num_rows, tile)
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  if tail_group:
    starts_G = jnp.append(starts_G, ends_G[-1])
    ends_G = jnp.append(ends_G, num_tiles * tile)
  num_groups = starts_G.shape[0]
  first_G = jnp.minimum(starts_G // tile, num_tiles - 1)
  count_G = jnp.where(ends_G > starts_G, (ends_G - 1) // tile - first_G + 1,
                      int(visit_empty_groups))
  num_slots = num_tiles + num_groups - 1
  group_S = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), count_G,
                       total_repeat_length=num_slots)
  step_S = jnp.arange(num_slots, dtype=jnp.int32)
  tile_S = first_G[group_S] + step_S - (jnp.cumsum(count_G) - count_G)[group_S]
  num_steps = jnp.sum(count_G).astype(jnp.int32)
  last = jnp.maximum(num_steps - 1, 0)
  real_S = step_S < num_steps
  return GroupTiles(
      group_S=jnp.where(real_S, group_S, group_S[last]),
      tile_S=jnp.clip(jnp.where(real_S, tile_S, tile_S[last]), 0, num_tiles - 1),
      num_steps=num_steps,
      starts_G=starts_G,
      ends_G=ends_G,
  )


# ------------------------------------------------------------------------------------ reference


def group_of_rows(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """g(m) for each row m, and G for rows past every group."""
  ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32))
  return jnp.searchsorted(ends_G, jnp.arange(num_rows), side="right").astype(jnp.int32)


def _row_group_onehot(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """float32 [M, G]: 1 where row m belongs to group g (rows past every group are all 0)."""
  groups_G = jnp.arange(group_sizes_G.shape[0])
  return (group_of_rows(group_sizes_G, num_rows)[:, None] == groups_G).astype(jnp.float32)


def gmm_reference(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  """Dense reference of `gmm`: y[m] = sum_g [g(m) = g] lhs[m] rhs[g], in float32."""
  onehot_MG = _row_group_onehot(group_sizes_G, lhs_MK.shape[0])
  y_MN = jnp.einsum("mg,mk,gkn->mn", onehot_MG, lhs_MK.astype(jnp.float32),
                    rhs_GKN.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  return y_MN.astype(jnp.result_type(lhs_MK, rhs_GKN))


def tgmm_reference(lhs_MK: jax.Array, grad_MN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  """Dense reference of `tgmm`: dw[g] = sum_m [g(m) = g] lhs[m]^T grad[m], in float32."""
  onehot_MG = _row_group_onehot(group_sizes_G, lhs_MK.shape[0])
  dw_GKN = jnp.einsum("mg,mk,mn->gkn", onehot_MG, lhs_MK.astype(jnp.float32),
                      grad_MN.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  return dw_GKN.astype(jnp.result_type(lhs_MK, grad_MN))


# ------------------------------------------------------------------------------------ public API


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *,
        implementation: str = "auto", interpret: bool = False,
        tiling: Tiling = DEFAULT_TILING, platform: str | None = None) -> jax.Array:
  """Grouped matmul: y[m] = lhs[m] @ rhs[g(m)], rows past sum(group_sizes) are 0.

  Args:
    lhs_MK: `[M, K]` rows sorted by group.
    rhs_GKN: `[G, K, N]` one matrix per group.
    group_sizes_G: int `[G]`, non-negative; rows past M are cut off.
    implementation: "auto", "pallas", "xla" or "reference" (see `kernels.backend`).
    interpret: run the Pallas kernel in the Pallas interpreter (CPU tests).
    tiling: (tm, tk, tn) tile sizes of the Pallas kernels; the XLA loop uses tm as its whole
      row tile (`xla_window_sizes` lists the smaller windows).
    platform: the platform to plan for (default: JAX's default backend), e.g. "tpu" to lower
      the TPU kernel from a CPU host with `jax.export`.

  Returns:
    `[M, N]` in the inputs' result dtype, accumulated in float32.
  """
  _check_lhs_and_group_sizes(lhs_MK, group_sizes_G)
  if rhs_GKN.ndim != 3 or rhs_GKN.shape[:2] != (group_sizes_G.shape[0], lhs_MK.shape[1]):
    raise ValueError(f"rhs must be [G, K, N] = [{group_sizes_G.shape[0]}, {lhs_MK.shape[1]}, N] "
                     f"(G from group_sizes, K from lhs), got shape {rhs_GKN.shape}")
  config = _config(implementation, interpret, tiling, platform)
  if config.backend.kind == "reference":
    return gmm_reference(lhs_MK, rhs_GKN, group_sizes_G)
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G, config)


def tgmm(lhs_MK: jax.Array, grad_MN: jax.Array, group_sizes_G: jax.Array, *,
         implementation: str = "auto", interpret: bool = False,
         tiling: Tiling = DEFAULT_TILING, platform: str | None = None) -> jax.Array:
  """Transposed grouped matmul: dw[g] = lhs[rows of g]^T @ grad[rows of g], `[G, K, N]`.

  The weight gradient of `gmm`; an empty group gets zeros. Arguments as in `gmm`, with
  grad_MN `[M, N]` in place of rhs.
  """
  _check_lhs_and_group_sizes(lhs_MK, group_sizes_G)
  if grad_MN.ndim != 2 or grad_MN.shape[0] != lhs_MK.shape[0]:
    raise ValueError(f"grad must be [M, N] with M = {lhs_MK.shape[0]} (lhs's), got shape "
                     f"{grad_MN.shape}")
  config = _config(implementation, interpret, tiling, platform)
  if config.backend.kind == "reference":
    return tgmm_reference(lhs_MK, grad_MN, group_sizes_G)
  return _tgmm(lhs_MK, grad_MN, group_sizes_G, config)


class _Config(NamedTuple):
  backend: backend_lib.Backend
  tiling: Tiling


def _config(implementation: str, interpret: bool, tiling: Tiling,
            platform: str | None) -> _Config:
  """The resolved backend and tiling; tiles a compiled kernel cannot use are an error."""
  tiling = tuple(tiling)
  if len(tiling) != 3 or not all(isinstance(t, int) and t >= 1 for t in tiling):
    raise ValueError(f"tiling must be three positive ints (tm, tk, tn), got {tiling}")
  backend = backend_lib.resolve_backend(implementation, interpret, platform)
  if backend.kind == "pallas" and not backend.interpret:
    if backend.platform == "tpu" and any(t % a for t, a in zip(tiling, _TPU_ALIGN)):
      raise ValueError(f"the TPU kernel needs tiling in multiples of {_TPU_ALIGN}, got {tiling}")
    if backend.platform == "gpu" and any(t & (t - 1) for t in tiling):
      raise ValueError(f"the GPU kernel needs tiling in powers of two, got {tiling}")
  return _Config(backend, tiling)


def _check_lhs_and_group_sizes(lhs_MK: jax.Array, group_sizes_G: jax.Array):
  """lhs is 2-D and group_sizes a non-empty int vector, or a ValueError naming them."""
  if lhs_MK.ndim != 2:
    raise ValueError(f"lhs must be [M, K], got shape {lhs_MK.shape}")
  if (group_sizes_G.ndim != 1 or group_sizes_G.shape[0] < 1
      or not jnp.issubdtype(group_sizes_G.dtype, jnp.integer)):
    raise ValueError(f"group_sizes must be a non-empty int vector [G], got dtype "
                     f"{group_sizes_G.dtype} and shape {group_sizes_G.shape}")


# ------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_MK, rhs_GKN, group_sizes_G, config):
  return _run_gmm(lhs_MK, rhs_GKN, group_sizes_G, False, config)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, config):
  y_MN = _run_gmm(lhs_MK, rhs_GKN, group_sizes_G, False, config)
  return y_MN, (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(config, residuals, dy_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  dlhs_MK = _run_gmm(dy_MN, rhs_GKN, group_sizes_G, True, config)
  drhs_GKN = _run_tgmm(lhs_MK, dy_MN, group_sizes_G, config)
  return dlhs_MK.astype(lhs_MK.dtype), drhs_GKN.astype(rhs_GKN.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tgmm(lhs_MK, grad_MN, group_sizes_G, config):
  return _run_tgmm(lhs_MK, grad_MN, group_sizes_G, config)


def _tgmm_fwd(lhs_MK, grad_MN, group_sizes_G, config):
  dw_GKN = _run_tgmm(lhs_MK, grad_MN, group_sizes_G, config)
  return dw_GKN, (lhs_MK, grad_MN, group_sizes_G)


def _tgmm_bwd(config, residuals, ct_GKN):
  lhs_MK, grad_MN, group_sizes_G = residuals
  dlhs_MK = _run_gmm(grad_MN, ct_GKN, group_sizes_G, True, config)
  dgrad_MN = _run_gmm(lhs_MK, ct_GKN, group_sizes_G, False, config)
  return dlhs_MK.astype(lhs_MK.dtype), dgrad_MN.astype(grad_MN.dtype), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _run_gmm(lhs_MK, rhs, group_sizes_G, transpose_rhs, config):
  """out[m] = lhs[m] @ rhs[g(m)] (rhs[g(m)]^T if transpose_rhs) on the configured backend."""
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.result_type(lhs_MK, rhs)
  if lhs_MK.shape[0] == 0:
    return jnp.zeros((0, out_dim), out_dtype)
  backend = config.backend
  if backend.kind == "xla":
    return _gmm_xla(lhs_MK, rhs, group_sizes_G, transpose_rhs, config.tiling[0], out_dtype)
  kernel = _gmm_tpu if backend.platform == "tpu" else _gmm_gpu
  return kernel(lhs_MK, rhs, group_sizes_G, transpose_rhs, config.tiling, out_dtype,
                backend.interpret)


def _run_tgmm(lhs_MK, grad_MN, group_sizes_G, config):
  """dw[g] = lhs[rows of g]^T grad[rows of g] on the configured backend."""
  out_dtype = jnp.result_type(lhs_MK, grad_MN)
  shape = (group_sizes_G.shape[0], lhs_MK.shape[1], grad_MN.shape[1])
  if lhs_MK.shape[0] == 0:
    return jnp.zeros(shape, out_dtype)
  backend = config.backend
  if backend.kind == "xla":
    return _tgmm_xla(lhs_MK, grad_MN, group_sizes_G, config.tiling[0], out_dtype)
  kernel = _tgmm_tpu if backend.platform == "tpu" else _tgmm_gpu
  return kernel(lhs_MK, grad_MN, group_sizes_G, config.tiling, out_dtype,
                backend.interpret)


# -------------------------------------------------------------------------------------- XLA


def xla_window_sizes(num_rows: int, tile: int) -> tuple[int, ...]:
  """The static row-window sizes of the XLA loop, ascending, each capped at num_rows.

  `tile` and, below it, p, 5p/4, 3p/2 and 7p/4 for p = 16, 32, 64, ...: the smallest size
  holding r <= tile rows is at most max(16, 1.25 r).
  """
  sizes = {tile}
  octave = _XLA_MIN_WINDOW
  while octave < tile:
    sizes.update(s for s in (octave, 5 * octave // 4, 3 * octave // 2, 7 * octave // 4)
                 if s < tile)
    octave *= 2
  return tuple(sorted({min(s, num_rows) for s in sizes}))


def _window(start: jax.Array, end: jax.Array, size: int, num_rows: int):
  """A `size`-row window holding rows [start, end): its first row, moved back to keep the
  window inside the array, and the `[size, 1]` mask of the rows in [start, end)."""
  first = jnp.minimum(start, num_rows - size)
  rows_R = first + jnp.arange(size, dtype=jnp.int32)
  return first, ((rows_R >= start) & (rows_R < end))[:, None]


def _switch_on_window(rows: jax.Array, sizes: tuple[int, ...], branch):
  """`branch(size)()` for the smallest of the ascending `sizes` holding `rows` <= sizes[-1]."""
  index = jnp.sum(jnp.asarray(sizes) < rows)
  return lax.switch(index, [functools.partial(branch, size) for size in sizes])


def _full_tiles(start: jax.Array, end: jax.Array, tile: int, step, carry):
  """(carry, next_row): carry = step(first, carry) for each whole tile [first, first + tile)
  of rows [start, end) in turn; next_row is the first row after those tiles."""

  def body(_, carry_and_row):
    carry, row = carry_and_row
    return step(row, carry), row + tile

  return lax.fori_loop(0, (end - start) // tile, body, (carry, start))


def _gmm_xla(lhs_MK, rhs, group_sizes_G, transpose_rhs, tile_m, out_dtype):
  """A loop over groups: per group, a `[tm, K] x [K, N]` matmul per whole row tile, written to
  its rows, then one matmul for the rest in the smallest window that holds it."""
  num_rows = lhs_MK.shape[0]
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  sizes = xla_window_sizes(num_rows, tile_m)
  tile = sizes[-1]
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

  def group(g, out_MN):
    rhs_KN = lax.dynamic_index_in_dim(rhs, g, keepdims=False)
    end = ends_G[g]

    def matmul(first, size):
      lhs_RK = lax.dynamic_slice_in_dim(lhs_MK, first, size)
      return lax.dot_general(lhs_RK, rhs_KN, (contract, ((), ())),
                             preferred_element_type=jnp.float32).astype(out_dtype)

    def write_tile(first, out_MN):
      return lax.dynamic_update_slice_in_dim(out_MN, matmul(first, tile), first, axis=0)

    out_MN, start = _full_tiles(starts_G[g], end, tile, write_tile, out_MN)
    # A switch branch cannot update out_MN in place (XLA would copy it), so each returns the
    # rest's rows placed in a `tile`-row block, written back under the mask.
    first, mine_T1 = _window(start, end, tile, num_rows)

    def rest_block(size):
      window_first, _ = _window(start, end, size, num_rows)
      return lax.dynamic_update_slice_in_dim(
          jnp.zeros((tile, out_dim), out_dtype), matmul(window_first, size),
          window_first - first, axis=0)

    block_TN = _switch_on_window(end - start, sizes, rest_block)
    old_TN = lax.dynamic_slice_in_dim(out_MN, first, tile)
    return lax.dynamic_update_slice_in_dim(out_MN, jnp.where(mine_T1, block_TN, old_TN), first,
                                           axis=0)

  return lax.fori_loop(0, group_sizes_G.shape[0], group,
                       jnp.zeros((num_rows, out_dim), out_dtype))


def _tgmm_xla(lhs_MK, grad_MN, group_sizes_G, tile_m, out_dtype):
  """A loop over groups: per group, the sum of `[K, tm] x [tm, N]` matmuls over its whole row
  tiles and one over the rest in the smallest window that holds it, masked to the group."""
  if lhs_MK.shape[1] > grad_MN.shape[1]:
    # dw[g]^T = grad[rows of g]^T lhs[rows of g]: the `[N, R] x [R, K]` products with the
    # narrower operand transposed run faster on CPU (1.4x for K = 256, N = 128).
    return _tgmm_xla(grad_MN, lhs_MK, group_sizes_G, tile_m, out_dtype).transpose(0, 2, 1)
  num_rows = lhs_MK.shape[0]
  sizes = xla_window_sizes(num_rows, tile_m)
  tile = sizes[-1]
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  # XLA:CPU's fast dot path (YNNPACK) takes `[K, R] x [R, N]` but not `[R, K]^T x [R, N]`,
  # which falls back to a slower one: one transposed copy of lhs pays for itself.
  lhs_KM = lhs_MK.T

  def matmul(first, size, mine_R1=None):
    lhs_KR = lax.dynamic_slice_in_dim(lhs_KM, first, size, axis=1)
    grad_RN = lax.dynamic_slice_in_dim(grad_MN, first, size)
    if mine_R1 is not None:
      lhs_KR = jnp.where(mine_R1.T, lhs_KR, 0)
      grad_RN = jnp.where(mine_R1, grad_RN, 0)
    return jnp.dot(lhs_KR, grad_RN, preferred_element_type=jnp.float32)

  def group(g, dw_GKN):
    end = ends_G[g]
    acc_KN = jnp.zeros(dw_GKN.shape[1:], jnp.float32)
    acc_KN, start = _full_tiles(starts_G[g], end, tile,
                                lambda first, acc_KN: acc_KN + matmul(first, tile), acc_KN)

    def rest(size):
      first, mine_R1 = _window(start, end, size, num_rows)
      return matmul(first, size, mine_R1)

    dw_KN = acc_KN + _switch_on_window(end - start, sizes, rest)
    return lax.dynamic_update_index_in_dim(dw_GKN, dw_KN.astype(out_dtype), g, axis=0)

  shape = (group_sizes_G.shape[0], lhs_MK.shape[1], grad_MN.shape[1])
  return lax.fori_loop(0, shape[0], group, jnp.zeros(shape, out_dtype))


# ----------------------------------------------------------------------------- Pallas helpers


def _round_up(value: int, multiple: int) -> int:
  return pl.cdiv(value, multiple) * multiple


def _fit_tiles(tiling: Tiling, dims: tuple[int, int, int], platform: str) -> Tiling:
  """Tiles no larger than their dims rounded up to a block a kernel accepts: (16, 128, 128)
  multiples on TPU, powers of two >= 16 on GPU (Triton's shapes)."""
  if platform == "tpu":
    return tuple(min(t, _round_up(d, a)) for t, d, a in zip(tiling, dims, _TPU_ALIGN))
  return tuple(max(_GPU_MIN_TILE, min(t, pl.next_power_of_2(d))) for t, d in zip(tiling, dims))


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x zero-padded at the end of each dim to `shape` (no copy when it already has it)."""
  if x.shape == shape:
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _padded_operands(lhs_MK, rhs, transpose_rhs, tiles):
  """lhs and rhs zero-padded to whole (tm, tk) and (tk, tn) tiles; the contraction dim is K."""
  tm, tk, tn = tiles
  num_rows, contract = lhs_MK.shape
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  lhs_MK = _pad_to(lhs_MK, (_round_up(num_rows, tm), _round_up(contract, tk)))
  rhs_shape = (_round_up(out_dim, tn), _round_up(contract, tk))
  rhs = _pad_to(rhs, (rhs.shape[0],) + (rhs_shape if transpose_rhs else rhs_shape[::-1]))
  return lhs_MK, rhs


# --------------------------------------------------------------------------------- Pallas TPU


def _gmm_tpu(lhs_MK, rhs, group_sizes_G, transpose_rhs, tiling, out_dtype, interpret):
  """Mosaic kernel on a fixed grid (N tiles, tiles + G steps, K tiles) guarded by pl.when."""
  num_rows, contract = lhs_MK.shape
  num_groups = rhs.shape[0]
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = _fit_tiles(tiling, (num_rows, contract, out_dim), "tpu")
  lhs_MK, rhs = _padded_operands(lhs_MK, rhs, transpose_rhs, (tm, tk, tn))
  tiles_k, tiles_n = lhs_MK.shape[1] // tk, pl.cdiv(out_dim, tn)
  plan = make_group_tiles(group_sizes_G, num_rows, tm, visit_empty_groups=False, tail_group=True)
  num_slots = plan.group_S.shape[0]
  contract_dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(num_steps_ref, group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, rhs_ref,
             out_ref, acc_ref):
    step, k = pl.program_id(1), pl.program_id(2)
    group = group_ref[step]
    real = step < num_steps_ref[0]

    @pl.when(k == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real & (group < num_groups))  # the tail group multiplies nothing
    def _():
      acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], contract_dims,
                                      preferred_element_type=jnp.float32)

    @pl.when(real & (k == tiles_k - 1))
    def _():
      rows = tile_ref[step] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mine = (rows >= starts_ref[group]) & (rows < ends_ref[group])
      out_ref[...] = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
          out_ref.dtype)

  def lhs_map(n, step, k, num_steps, group_S, tile_S, starts, ends):
    del n, num_steps, group_S, starts, ends
    return tile_S[step], k

  def rhs_map(n, step, k, num_steps, group_S, tile_S, starts, ends):
    del num_steps, tile_S, starts, ends
    group = jnp.minimum(group_S[step], num_groups - 1)
    return (group, n, k) if transpose_rhs else (group, k, n)

  def out_map(n, step, k, num_steps, group_S, tile_S, starts, ends):
    del k, num_steps, group_S, starts, ends
    return tile_S[step], n

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  out_MN = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((lhs_MK.shape[0], tiles_n * tn), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(tiles_n, num_slots, tiles_k),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(plan.num_steps[None], plan.group_S, plan.tile_S, plan.starts_G, plan.ends_G, lhs_MK, rhs)
  return out_MN[:num_rows, :out_dim]


def _pad_tgmm_operands(lhs_MK, grad_MN, tiling, platform):
  """(lhs, grad) zero-padded to whole tiles, and the (tm, tk, tn) tiles fitted to their shapes."""
  num_rows, contract = lhs_MK.shape
  tm, tk, tn = _fit_tiles(tiling, (num_rows, contract, grad_MN.shape[1]), platform)
  padded_rows = _round_up(num_rows, tm)
  lhs_MK = _pad_to(lhs_MK, (padded_rows, _round_up(contract, tk)))
  grad_MN = _pad_to(grad_MN, (padded_rows, _round_up(grad_MN.shape[1], tn)))
  return lhs_MK, grad_MN, (tm, tk, tn)


def _tgmm_tpu(lhs_MK, grad_MN, group_sizes_G, tiling, out_dtype, interpret):
  """Mosaic kernel on a fixed grid (K tiles, N tiles, tiles + G - 1 steps): a group's steps are
  consecutive, accumulate in VMEM and store once; an empty group's one step stores zeros."""
  num_rows, contract = lhs_MK.shape
  out_dim = grad_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  lhs_MK, grad_MN, (tm, tk, tn) = _pad_tgmm_operands(lhs_MK, grad_MN, tiling, "tpu")
  tiles_k, tiles_n = lhs_MK.shape[1] // tk, grad_MN.shape[1] // tn
  plan = make_group_tiles(group_sizes_G, num_rows, tm, visit_empty_groups=True, tail_group=False)
  num_slots = plan.group_S.shape[0]

  def kernel(num_steps_ref, group_ref, tile_ref, starts_ref, ends_ref, lhs_ref, grad_ref,
             out_ref, acc_ref):
    step = pl.program_id(2)
    num_steps = num_steps_ref[0]
    group = group_ref[step]
    real = step < num_steps
    first = (step == 0) | (group_ref[jnp.maximum(step - 1, 0)] != group)
    last = (step == num_steps - 1) | (group_ref[jnp.minimum(step + 1, num_slots - 1)] != group)

    @pl.when(real & first)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real)
    def _():
      rows = tile_ref[step] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      mine = (rows >= starts_ref[group]) & (rows < ends_ref[group])
      lhs = jnp.where(mine, lhs_ref[...].astype(jnp.float32), 0).astype(lhs_ref.dtype)
      grad = jnp.where(mine, grad_ref[...].astype(jnp.float32), 0).astype(grad_ref.dtype)
      acc_ref[...] += jnp.dot(lhs.T, grad, preferred_element_type=jnp.float32)

    @pl.when(real & last)
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  def lhs_map(k, n, step, num_steps, group_S, tile_S, starts, ends):
    del n, num_steps, group_S, starts, ends
    return tile_S[step], k

  def grad_map(k, n, step, num_steps, group_S, tile_S, starts, ends):
    del k, num_steps, group_S, starts, ends
    return tile_S[step], n

  def out_map(k, n, step, num_steps, group_S, tile_S, starts, ends):
    del num_steps, tile_S, starts, ends
    return group_S[step], k, n

  dw_GKN = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(tiles_k, tiles_n, num_slots),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(plan.num_steps[None], plan.group_S, plan.tile_S, plan.starts_G, plan.ends_G, lhs_MK, grad_MN)
  return dw_GKN[:, :contract, :out_dim]


# --------------------------------------------------------------------------------- Pallas GPU


def _gmm_gpu(lhs_MK, rhs, group_sizes_G, transpose_rhs, tiling, out_dtype, interpret):
  """Triton kernel, grid (M tiles, N tiles): a program sums, over the groups overlapping its row
  tile, the group's rows of lhs_tile @ rhs[g]; rows in no group stay 0."""
  num_rows, contract = lhs_MK.shape
  out_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = _fit_tiles(tiling, (num_rows, contract, out_dim), "gpu")
  lhs_MK, rhs = _padded_operands(lhs_MK, rhs, transpose_rhs, (tm, tk, tn))
  tiles_m, tiles_k, tiles_n = lhs_MK.shape[0] // tm, lhs_MK.shape[1] // tk, pl.cdiv(out_dim, tn)
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)
  tile_starts_T = jnp.arange(tiles_m, dtype=jnp.int32) * tm
  first_T = jnp.searchsorted(ends_G, tile_starts_T, side="right").astype(jnp.int32)
  last_row_T = jnp.minimum(tile_starts_T + tm, ends_G[-1]) - 1
  last_T = jnp.searchsorted(ends_G, last_row_T, side="right").astype(jnp.int32)

  def kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref):
    t, n = pl.program_id(0), pl.program_id(1)
    rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def add_group(g, acc):
      mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])

      def add_k_tile(k, acc):
        lhs = lhs_ref[pl.ds(t * tm, tm), pl.ds(k * tk, tk)]
        lhs = jnp.where(mine, lhs, jnp.zeros_like(lhs))
        if transpose_rhs:
          rhs_tile = rhs_ref[g, pl.ds(n * tn, tn), pl.ds(k * tk, tk)]
          return acc + lax.dot_general(lhs, rhs_tile, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
        rhs_tile = rhs_ref[g, pl.ds(k * tk, tk), pl.ds(n * tn, tn)]
        return acc + jnp.dot(lhs, rhs_tile, preferred_element_type=jnp.float32)

      return lax.fori_loop(0, tiles_k, add_k_tile, acc)

    acc = lax.fori_loop(first_ref[t], last_ref[t] + 1, add_group,
                        jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  whole = pl.BlockSpec()
  out_MN = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((lhs_MK.shape[0], tiles_n * tn), out_dtype),
      grid=(tiles_m, tiles_n),
      in_specs=[whole] * 6,
      out_specs=pl.BlockSpec((tm, tn), lambda t, n: (t, n)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(first_T, last_T, starts_G, ends_G, lhs_MK, rhs)
  return out_MN[:num_rows, :out_dim]


def _tgmm_gpu(lhs_MK, grad_MN, group_sizes_G, tiling, out_dtype, interpret):
  """Triton kernel, grid (G, K tiles, N tiles): a program sums lhs_tile^T grad_tile over its
  group's row tiles (none for an empty group, which stores zeros)."""
  num_rows, contract = lhs_MK.shape
  out_dim = grad_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  lhs_MK, grad_MN, (tm, tk, tn) = _pad_tgmm_operands(lhs_MK, grad_MN, tiling, "gpu")
  tiles_k, tiles_n = lhs_MK.shape[1] // tk, grad_MN.shape[1] // tn
  starts_G, ends_G = group_bounds(group_sizes_G, num_rows)

  def kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref):
    g, k, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]

    def add_tile(t, acc):
      rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
      mine = (rows >= start) & (rows < end)
      lhs = lhs_ref[pl.ds(t * tm, tm), pl.ds(k * tk, tk)]
      grad = grad_ref[pl.ds(t * tm, tm), pl.ds(n * tn, tn)]
      lhs = jnp.where(mine, lhs, jnp.zeros_like(lhs))
      grad = jnp.where(mine, grad, jnp.zeros_like(grad))
      return acc + lax.dot_general(lhs, grad, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    acc = lax.fori_loop(start // tm, pl.cdiv(end, tm), add_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  whole = pl.BlockSpec()
  dw_GKN = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
      grid=(num_groups, tiles_k, tiles_n),
      in_specs=[whole] * 4,
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, k, n: (g, k, n)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(starts_G, ends_G, lhs_MK, grad_MN)
  return dw_GKN[:, :contract, :out_dim]
