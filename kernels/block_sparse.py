"""Block-sparse matmul y = x W, with W stored as its nonzero blocks, and its gradients.

W `[K, N]` is cut into an `[R, C]` grid of `[bk, bn]` blocks (K = R bk, N = C bn); only the Z
blocks listed by a `BlockSchedule` are stored, as blocks_Zkn `[Z, bk, bn]` in the schedule's
row-major order. Shape letters beyond the DESIGN legend: M rows of x, Z stored blocks, R / C block
rows / columns, S schedule steps, k / n a block's own rows / columns.

  y[:, c]    = sum_{z in column c} x[:, r_z] blocks[z]         (a column with no block gives 0)
  dx[:, r]   = sum_{z in row r} dy[:, c_z] blocks[z]^T          (the by_row pass)
  dblocks[z] = x[:, r_z]^T dy[:, c_z]                           (only the stored blocks)

Backends (chosen by `implementation`, see `kernels.backend`):

  reference   W densified, y = x W, differentiated by JAX.
  xla         at density <= DENSE_ABOVE: while loops over the stored blocks, one `[M, bk] x
              [bk, bn]` matmul per block accumulated into its output columns; above it, the
              densified matmul, which costs less on CPU once most blocks exist.
  pallas tpu  grid (M tiles, S steps) over the by_col (y) or by_row (dx) steps, passed as scalar
              prefetch; an output block accumulates in VMEM over its consecutive steps and is
              stored on each of them, so a block with only a dead step is stored as zeros.
              dblocks: grid (Z, M tiles), a reduction over M per stored block.
  pallas gpu  Triton, grid (M tiles, C) (resp. R): a program loops over its output's steps
              [start_O1[o], start_O1[o + 1]). dblocks: grid (Z,).

Gradients go through `jax.custom_vjp`. Gray, Radford & Kingma 2017, "GPU Kernels for
Block-Sparse Weights".
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
from kernels.block_schedule import BlockSchedule, BlockSteps

DENSE_ABOVE = 0.8  # above this block density the XLA backend multiplies the densified W
DEFAULT_TILE_M = 128
_TPU_LANE = 128
_GPU_MIN_TILE = 16


def densify_blocks(blocks_Zkn: jax.Array, schedule: BlockSchedule) -> jax.Array:
  """W `[R bk, C bn]`: each stored block at its grid position, zeros elsewhere."""
  num_rows, num_cols = schedule.grid_shape
  _, bk, bn = blocks_Zkn.shape
  grid_RCkn = jnp.zeros((num_rows, num_cols, bk, bn), blocks_Zkn.dtype)
  grid_RCkn = grid_RCkn.at[schedule.rows_Z, schedule.cols_Z].set(blocks_Zkn)
  return grid_RCkn.transpose(0, 2, 1, 3).reshape(num_rows * bk, num_cols * bn)


def block_sparse_matmul_reference(x_MK: jax.Array, blocks_Zkn: jax.Array,
                                  schedule: BlockSchedule) -> jax.Array:
  """Dense reference: y = x densify(blocks), in float32."""
  w_KN = densify_blocks(blocks_Zkn, schedule)
  y_MN = jnp.dot(x_MK.astype(jnp.float32), w_KN.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  return y_MN.astype(jnp.result_type(x_MK, blocks_Zkn))


def block_sparse_matmul(x_MK: jax.Array, blocks_Zkn: jax.Array, schedule: BlockSchedule, *,
                        implementation: str = "auto", interpret: bool = False,
                        tile_m: int = DEFAULT_TILE_M, platform: str | None = None) -> jax.Array:
  """y = x W for the block-sparse W given by its stored blocks and their schedule.

  Args:
    x_MK: `[M, K]`, K = R bk.
    blocks_Zkn: `[Z, bk, bn]`, the stored blocks in `schedule`'s row-major order.
    schedule: `build_block_schedule(mask_RC)` of W's block mask.
    implementation: "auto", "pallas", "xla" or "reference" (see `kernels.backend`).
    interpret: run the Pallas kernel in the Pallas interpreter (CPU tests).
    tile_m: rows of x per Pallas program.
    platform: the platform to plan for (default: JAX's default backend), e.g. "tpu" to lower
      the TPU kernel from a CPU host with `jax.export`.

  Returns:
    `[M, C bn]` in the inputs' result dtype, accumulated in float32.
  """
  _check_args(x_MK, blocks_Zkn, schedule)
  if tile_m < 1:
    raise ValueError(f"tile_m must be >= 1, got {tile_m}")
  backend = backend_lib.resolve_backend(implementation, interpret, platform)
  schedule = jax.tree.map(jnp.asarray, schedule)
  if backend.kind == "reference":
    return block_sparse_matmul_reference(x_MK, blocks_Zkn, schedule)
  if backend.kind == "pallas" and not backend.interpret:
    _check_pallas_blocks(blocks_Zkn.shape[1:], backend.platform)
  return _bsmm(x_MK, blocks_Zkn, schedule, _Config(backend, tile_m))


def _check_args(x_MK, blocks_Zkn, schedule):
  """Shapes of x and the blocks agree with the schedule, or a ValueError naming them."""
  if blocks_Zkn.ndim != 3 or blocks_Zkn.shape[0] != schedule.num_blocks:
    raise ValueError(f"blocks must be [Z, bk, bn] with Z = {schedule.num_blocks} (the "
                     f"schedule's), got shape {blocks_Zkn.shape}")
  contract = schedule.grid_shape[0] * blocks_Zkn.shape[1]
  if x_MK.ndim != 2 or x_MK.shape[1] != contract:
    raise ValueError(f"x must be [M, {contract}] (R bk = {schedule.grid_shape[0]} x "
                     f"{blocks_Zkn.shape[1]}), got shape {x_MK.shape}")


def _check_pallas_blocks(block_shape: tuple[int, int], platform: str):
  """Blocks the compiled kernels can tile: multiples of 128 on TPU, powers of two >= 16 on GPU."""
  if platform == "tpu" and any(d % _TPU_LANE for d in block_shape):
    raise ValueError(f"the TPU kernel needs block dims that are multiples of {_TPU_LANE}, got "
                     f"{block_shape}")
  if platform == "gpu" and any(d < _GPU_MIN_TILE or d & (d - 1) for d in block_shape):
    raise ValueError(f"the GPU kernel needs block dims that are powers of two >= "
                     f"{_GPU_MIN_TILE}, got {block_shape}")


class _Config(NamedTuple):
  backend: backend_lib.Backend
  tile_m: int


# ------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bsmm(x_MK, blocks_Zkn, schedule, config):
  return _forward(x_MK, blocks_Zkn, schedule, config)


def _bsmm_fwd(x_MK, blocks_Zkn, schedule, config):
  return _forward(x_MK, blocks_Zkn, schedule, config), (x_MK, blocks_Zkn, schedule)


def _bsmm_bwd(config, residuals, dy_MN):
  x_MK, blocks_Zkn, schedule = residuals
  dx_MK, dblocks_Zkn = _backward(x_MK, blocks_Zkn, schedule, dy_MN, config)
  return dx_MK.astype(x_MK.dtype), dblocks_Zkn.astype(blocks_Zkn.dtype), None


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


def _uses_dense_xla(schedule: BlockSchedule, config: _Config) -> bool:
  """Whether the XLA backend multiplies the densified W (density above DENSE_ABOVE)."""
  return config.backend.kind == "xla" and schedule.density > DENSE_ABOVE


def _forward(x_MK, blocks_Zkn, schedule, config):
  """y = x W on the configured backend."""
  out_dtype = jnp.result_type(x_MK, blocks_Zkn)
  num_rows = x_MK.shape[0]
  out_dim = schedule.grid_shape[1] * blocks_Zkn.shape[2]
  if schedule.num_blocks == 0 or num_rows == 0:
    return jnp.zeros((num_rows, out_dim), out_dtype)
  if _uses_dense_xla(schedule, config):
    return jnp.dot(x_MK, densify_blocks(blocks_Zkn, schedule),
                   preferred_element_type=jnp.float32).astype(out_dtype)
  if config.backend.kind == "xla":
    return _forward_xla(x_MK, blocks_Zkn, schedule, out_dtype)
  return _pallas_pass(x_MK, blocks_Zkn, schedule.by_col, False, out_dim, config, out_dtype)


def _backward(x_MK, blocks_Zkn, schedule, dy_MN, config):
  """(dx, dblocks) on the configured backend, in float32 or the inputs' dtype."""
  if schedule.num_blocks == 0 or x_MK.shape[0] == 0:
    return jnp.zeros_like(x_MK), jnp.zeros_like(blocks_Zkn)
  if _uses_dense_xla(schedule, config):
    return _backward_dense(x_MK, blocks_Zkn, schedule, dy_MN)
  if config.backend.kind == "xla":
    return _backward_xla(x_MK, blocks_Zkn, schedule, dy_MN)
  dx_MK = _pallas_pass(dy_MN, blocks_Zkn, schedule.by_row, True, x_MK.shape[1], config,
                       x_MK.dtype)
  kernel = _dblocks_tpu if config.backend.platform == "tpu" else _dblocks_gpu
  dblocks_Zkn = kernel(x_MK, dy_MN, schedule, blocks_Zkn.shape, config.tile_m, blocks_Zkn.dtype,
                       config.backend.interpret)
  return dx_MK, dblocks_Zkn


# -------------------------------------------------------------------------------------- XLA


def _forward_xla(x_MK, blocks_Zkn, schedule, out_dtype):
  """A loop over the stored blocks: y[:, c_z] += x[:, r_z] blocks[z], accumulated in float32."""
  _, bk, bn = blocks_Zkn.shape

  def add_block(z, y_MN):
    x_Mk = lax.dynamic_slice_in_dim(x_MK, schedule.rows_Z[z] * bk, bk, axis=1)
    part_Mn = jnp.dot(x_Mk, blocks_Zkn[z], preferred_element_type=jnp.float32)
    col = schedule.cols_Z[z] * bn
    old_Mn = lax.dynamic_slice_in_dim(y_MN, col, bn, axis=1)
    return lax.dynamic_update_slice_in_dim(y_MN, old_Mn + part_Mn, col, axis=1)

  out_shape = (x_MK.shape[0], schedule.grid_shape[1] * bn)
  y_MN = lax.fori_loop(0, schedule.num_blocks, add_block, jnp.zeros(out_shape, jnp.float32))
  return y_MN.astype(out_dtype)


def _backward_xla(x_MK, blocks_Zkn, schedule, dy_MN):
  """One loop over the stored blocks for both gradients, sharing the dy slice:
  dx[:, r_z] += dy[:, c_z] blocks[z]^T and dblocks[z] = x[:, r_z]^T dy[:, c_z]."""
  _, bk, bn = blocks_Zkn.shape

  def add_block(z, carry):
    dx_MK, dblocks_Zkn = carry
    row = schedule.rows_Z[z] * bk
    dy_Mn = lax.dynamic_slice_in_dim(dy_MN, schedule.cols_Z[z] * bn, bn, axis=1)
    part_Mk = lax.dot_general(dy_Mn, blocks_Zkn[z], (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    old_Mk = lax.dynamic_slice_in_dim(dx_MK, row, bk, axis=1)
    dx_MK = lax.dynamic_update_slice_in_dim(dx_MK, old_Mk + part_Mk, row, axis=1)
    x_Mk = lax.dynamic_slice_in_dim(x_MK, row, bk, axis=1)
    dblock_kn = lax.dot_general(x_Mk, dy_Mn, (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return dx_MK, lax.dynamic_update_index_in_dim(dblocks_Zkn, dblock_kn, z, axis=0)

  init = (jnp.zeros(x_MK.shape, jnp.float32), jnp.zeros(blocks_Zkn.shape, jnp.float32))
  return lax.fori_loop(0, schedule.num_blocks, add_block, init)


def _backward_dense(x_MK, blocks_Zkn, schedule, dy_MN):
  """dx = dy W^T with the densified W; dblocks = the stored blocks of x^T dy."""
  num_rows, num_cols = schedule.grid_shape
  _, bk, bn = blocks_Zkn.shape
  w_KN = densify_blocks(blocks_Zkn, schedule)
  dx_MK = lax.dot_general(dy_MN, w_KN, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  dw_KN = lax.dot_general(x_MK, dy_MN, (((0,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  dw_RkCn = dw_KN.reshape(num_rows, bk, num_cols, bn)
  return dx_MK, dw_RkCn[schedule.rows_Z, :, schedule.cols_Z, :]


# ------------------------------------------------------------------------------------ Pallas


def _fit_tile_m(tile_m: int, num_rows: int, platform: str) -> int:
  """Rows per program: a multiple of 16 on TPU, a power of two >= 16 on GPU, <= the rows."""
  if platform == "tpu":
    return min(tile_m, pl.cdiv(num_rows, 16) * 16)
  return max(_GPU_MIN_TILE, min(pl.next_power_of_2(tile_m), pl.next_power_of_2(num_rows)))


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  pad = -a.shape[0] % multiple
  return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _pallas_pass(a_MA, blocks_Zkn, steps: BlockSteps, transpose: bool, out_dim: int, config,
                 out_dtype):
  """out[:, o] = sum over o's live steps of a[:, in_s] blocks[block_s] (blocks^T if transpose).

  The forward pass is (x, by_col, transpose=False), the dx pass (dy, by_row, transpose=True).
  """
  platform = config.backend.platform
  num_rows = a_MA.shape[0]
  tm = _fit_tile_m(config.tile_m, num_rows, platform)
  a_MA = _pad_rows(a_MA, tm)
  kernel = _pass_tpu if platform == "tpu" else _pass_gpu
  out = kernel(a_MA, blocks_Zkn, steps, transpose, out_dim, tm, out_dtype,
               config.backend.interpret)
  return out[:num_rows]


def _pass_tpu(a_MA, blocks_Zkn, steps, transpose, out_dim, tm, out_dtype, interpret):
  """Mosaic kernel, grid (M tiles, S steps); the steps arrive as scalar prefetch."""
  _, bk, bn = blocks_Zkn.shape
  in_width, out_width = (bn, bk) if transpose else (bk, bn)
  contract = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))

  def kernel(out_ref, in_ref, block_ref, live_ref, a_ref, blocks_ref, o_ref, acc_ref):
    del in_ref, block_ref  # used by the index maps
    s = pl.program_id(1)
    first = (s == 0) | (out_ref[s] != out_ref[jnp.maximum(s - 1, 0)])
    live = live_ref[s] == 1

    @pl.when(first)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
      acc_ref[...] += lax.dot_general(a_ref[...], blocks_ref[...], contract,
                                      preferred_element_type=jnp.float32)

    @pl.when(first | live)
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  def a_map(m, s, out_S, in_S, block_S, live_S):
    del out_S, block_S, live_S
    return m, in_S[s]

  def blocks_map(m, s, out_S, in_S, block_S, live_S):
    del m, out_S, in_S, live_S
    return block_S[s], 0, 0

  def out_map(m, s, out_S, in_S, block_S, live_S):
    del in_S, block_S, live_S
    return m, out_S[s]

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((a_MA.shape[0], out_dim), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(a_MA.shape[0] // tm, steps.out_S.shape[0]),
          in_specs=[pl.BlockSpec((tm, in_width), a_map),
                    pl.BlockSpec((None, bk, bn), blocks_map)],
          out_specs=pl.BlockSpec((tm, out_width), out_map),
          scratch_shapes=[pltpu.VMEM((tm, out_width), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(steps.out_S, steps.in_S, steps.block_S, steps.live_S, a_MA, blocks_Zkn)


def _pass_gpu(a_MA, blocks_Zkn, steps, transpose, out_dim, tm, out_dtype, interpret):
  """Triton kernel, grid (M tiles, outputs): a program loops over its output's steps."""
  _, bk, bn = blocks_Zkn.shape
  in_width, out_width = (bn, bk) if transpose else (bk, bn)
  contract = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))

  def kernel(start_ref, in_ref, block_ref, live_ref, a_ref, blocks_ref, o_ref):
    m, o = pl.program_id(0), pl.program_id(1)

    def add_step(s, acc):
      a = a_ref[pl.ds(m * tm, tm), pl.ds(in_ref[s] * in_width, in_width)]
      part = lax.dot_general(a, blocks_ref[block_ref[s]], contract,
                             preferred_element_type=jnp.float32)
      return acc + part * live_ref[s].astype(jnp.float32)

    acc = lax.fori_loop(start_ref[o], start_ref[o + 1], add_step,
                        jnp.zeros((tm, out_width), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((a_MA.shape[0], out_dim), out_dtype),
      grid=(a_MA.shape[0] // tm, steps.start_O1.shape[0] - 1),
      in_specs=[whole] * 6,
      out_specs=pl.BlockSpec((tm, out_width), lambda m, o: (m, o)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(steps.start_O1, steps.in_S, steps.block_S, steps.live_S, a_MA, blocks_Zkn)


def _dblocks_tpu(x_MK, dy_MN, schedule, blocks_shape, tile_m, out_dtype, interpret):
  """Mosaic kernel, grid (Z, M tiles): dblocks[z] = sum over row tiles of x_tile^T dy_tile."""
  _, bk, bn = blocks_shape
  tm = _fit_tile_m(tile_m, x_MK.shape[0], "tpu")
  x_MK, dy_MN = _pad_rows(x_MK, tm), _pad_rows(dy_MN, tm)
  tiles_m = x_MK.shape[0] // tm

  def kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, acc_ref):
    del rows_ref, cols_ref  # used by the index maps
    m = pl.program_id(1)

    @pl.when(m == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(x_ref[...].T, dy_ref[...], preferred_element_type=jnp.float32)

    @pl.when(m == tiles_m - 1)
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(blocks_shape, out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(blocks_shape[0], tiles_m),
          in_specs=[pl.BlockSpec((tm, bk), lambda z, m, rows, cols: (m, rows[z])),
                    pl.BlockSpec((tm, bn), lambda z, m, rows, cols: (m, cols[z]))],
          out_specs=pl.BlockSpec((None, bk, bn), lambda z, m, rows, cols: (z, 0, 0)),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(schedule.rows_Z, schedule.cols_Z, x_MK, dy_MN)


def _dblocks_gpu(x_MK, dy_MN, schedule, blocks_shape, tile_m, out_dtype, interpret):
  """Triton kernel, grid (Z,): dblocks[z] = sum over row tiles of x_tile^T dy_tile."""
  _, bk, bn = blocks_shape
  tm = _fit_tile_m(tile_m, x_MK.shape[0], "gpu")
  x_MK, dy_MN = _pad_rows(x_MK, tm), _pad_rows(dy_MN, tm)

  def kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref):
    z = pl.program_id(0)
    row, col = rows_ref[z] * bk, cols_ref[z] * bn

    def add_tile(m, acc):
      x = x_ref[pl.ds(m * tm, tm), pl.ds(row, bk)]
      dy = dy_ref[pl.ds(m * tm, tm), pl.ds(col, bn)]
      return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, x_MK.shape[0] // tm, add_tile, jnp.zeros((bk, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(blocks_shape, out_dtype),
      grid=(blocks_shape[0],),
      in_specs=[whole] * 4,
      out_specs=pl.BlockSpec((None, bk, bn), lambda z: (z, 0, 0)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(schedule.rows_Z, schedule.cols_Z, x_MK, dy_MN)
