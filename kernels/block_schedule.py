"""Host-side schedules of the nonzero blocks of a block mask, for block-sparse kernels.

A block mask `mask_RC` (NumPy bool, R block rows by C block columns) marks which blocks of a
matrix exist. The Z stored blocks are numbered in row-major order: block z sits at
(rows_Z[z], cols_Z[z]). A kernel walks them in one of two passes:

  by_row: grouped by block row, e.g. dx[:, r] = sum_c dy[:, c] W[r, c]^T, or the kv blocks each
          query block of a block-sparse attention visits;
  by_col: grouped by block column, e.g. y[:, c] = sum_r x[:, r] W[r, c].

Each pass is a list of S steps, sorted by output index. An output with no block still gets one
step (live = 0) so that the kernel writes its zeros; the list is padded to a fixed capacity by
repeating its last step (live = 0), so that schedules of different masks with the same number of
blocks have the same shapes and a Pallas pipeline sees no new block index on the padding.

Built once on the host with NumPy (`build_block_schedule`), or inside `jit` from traced block
positions (`build_block_schedule_traced`, for masks that move during training); a
`BlockSchedule` is a pytree of int32 arrays (the grid shape is static) that jitted code and
Pallas scalar prefetch take as is. Layout as in BSR/CSR sparse
formats (Saad 2003, "Iterative Methods for Sparse Linear Systems", sec. 3.4).
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class BlockSteps:
  """One pass over the stored blocks, grouped by output index o (a block row or column).

  Step s multiplies stored block block_S[s], at output index out_S[s] and input index in_S[s]
  (the other grid coordinate), when live_S[s] == 1; a step with live_S[s] == 0 multiplies
  nothing. The steps of output o are s in [start_O1[o], start_O1[o + 1]), at least one each.
  """
  out_S: jax.Array
  in_S: jax.Array
  block_S: jax.Array
  live_S: jax.Array
  start_O1: jax.Array


@flax.struct.dataclass
class BlockSchedule:
  """The stored blocks of an `[R, C]` block mask and the two passes over them.

  rows_Z, cols_Z: grid position of stored block z (row-major order, the order of the blocks
  array). by_row, by_col: `BlockSteps` grouped by block row / block column, padded to the same
  capacity. grid_shape = (R, C) is static.
  """
  rows_Z: jax.Array
  cols_Z: jax.Array
  by_row: BlockSteps
  by_col: BlockSteps
  grid_shape: tuple[int, int] = flax.struct.field(pytree_node=False)

  @property
  def num_blocks(self) -> int:
    """Z, the number of stored blocks."""
    return self.rows_Z.shape[0]

  @property
  def density(self) -> float:
    """Z / (R C), the fraction of the grid that is stored."""
    return self.num_blocks / (self.grid_shape[0] * self.grid_shape[1])

  @property
  def capacity(self) -> int:
    """S, the number of steps of each pass (padding included)."""
    return self.by_row.out_S.shape[0]


def default_capacity(num_blocks: int, grid_shape: tuple[int, int]) -> int:
  """Z + max(R, C): the most steps a pass over any mask with Z blocks can need."""
  return num_blocks + max(grid_shape)


def build_block_schedule(mask_RC: np.ndarray, capacity: int | None = None) -> BlockSchedule:
  """The schedule of the True blocks of the NumPy bool mask `mask_RC`.

  Args:
    mask_RC: `[R, C]` bool, True where a block is stored; R, C >= 1.
    capacity: steps per pass; default `default_capacity(Z, (R, C))`. Must be at least the steps
      the mask needs (Z plus one per empty row, resp. column).

  Returns:
    A `BlockSchedule` of int32 NumPy arrays.
  """
  mask_RC = np.asarray(mask_RC)
  if mask_RC.ndim != 2 or mask_RC.dtype != np.bool_ or 0 in mask_RC.shape:
    raise ValueError(f"block mask must be a non-empty 2-D bool array, got dtype {mask_RC.dtype} "
                     f"and shape {mask_RC.shape}")
  num_rows, num_cols = mask_RC.shape
  rows_Z, cols_Z = np.nonzero(mask_RC)
  num_blocks = rows_Z.size
  if capacity is None:
    capacity = default_capacity(num_blocks, mask_RC.shape)
  needed = num_blocks + max(_num_empty(rows_Z, num_rows), _num_empty(cols_Z, num_cols))
  if capacity < needed:
    raise ValueError(f"capacity={capacity} is below the {needed} steps this block mask needs")
  col_order_Z = np.lexsort((rows_Z, cols_Z))
  return BlockSchedule(
      rows_Z=rows_Z.astype(np.int32),
      cols_Z=cols_Z.astype(np.int32),
      by_row=_build_steps(rows_Z, cols_Z, np.arange(num_blocks), num_rows, capacity),
      by_col=_build_steps(cols_Z[col_order_Z], rows_Z[col_order_Z], col_order_Z, num_cols,
                          capacity),
      grid_shape=(num_rows, num_cols),
  )


def _num_empty(index_Z: np.ndarray, num_outputs: int) -> int:
  return int(np.sum(np.bincount(index_Z, minlength=num_outputs) == 0))


def _build_steps(out_Z: np.ndarray, in_Z: np.ndarray, block_Z: np.ndarray, num_outputs: int,
                 capacity: int) -> BlockSteps:
  """Steps for blocks already sorted by output, one dead step per empty output, then padding.

  A dead step reuses the indices of the previous live step (of the first one for leading dead
  steps; 0 when there is no block), so a pipelined kernel fetches nothing new for it.
  """
  count_O = np.bincount(out_Z, minlength=num_outputs)
  steps_O = np.maximum(count_O, 1)
  start_O1 = np.concatenate([[0], np.cumsum(steps_O)])
  num_steps = int(start_O1[-1])
  live_S = np.ones(num_steps, np.int32)
  live_S[start_O1[:-1][count_O == 0]] = 0
  source_S = np.maximum(np.cumsum(live_S) - 1, 0)
  pad = capacity - num_steps
  return BlockSteps(
      out_S=_pad_repeating(np.repeat(np.arange(num_outputs), steps_O), pad),
      in_S=_pad_repeating(_take_or_zero(in_Z, source_S), pad),
      block_S=_pad_repeating(_take_or_zero(block_Z, source_S), pad),
      live_S=np.concatenate([live_S, np.zeros(pad, np.int32)]),
      start_O1=start_O1.astype(np.int32),
  )


def _take_or_zero(values_Z: np.ndarray, index_S: np.ndarray) -> np.ndarray:
  """values_Z[index_S], or zeros when there are no values."""
  return values_Z[index_S] if values_Z.size else np.zeros_like(index_S)


def _pad_repeating(values_S: np.ndarray, pad: int) -> np.ndarray:
  """`values_S` with its last entry repeated `pad` more times, as int32."""
  return np.concatenate([values_S, np.repeat(values_S[-1:], pad)]).astype(np.int32)


def traced_capacity(num_blocks: int, grid_shape: tuple[int, int]) -> int:
  """Z + max(R - ceil(Z / C), C - ceil(Z / R)): the most steps any mask with Z blocks needs.

  A row holds at most C blocks, so at least ceil(Z / C) rows are non-empty (likewise columns).
  """
  num_rows, num_cols = grid_shape
  return num_blocks + max(num_rows - -(-num_blocks // num_cols),
                          num_cols - -(-num_blocks // num_rows))


def build_block_schedule_traced(rows_Z: jax.Array, cols_Z: jax.Array,
                                grid_shape: tuple[int, int],
                                capacity: int | None = None) -> BlockSchedule:
  """The schedule of the Z distinct blocks at (rows_Z[z], cols_Z[z]), built with jnp (jit-safe).

  Block z is the z-th entry of the blocks array; the blocks may come in any order (each pass
  visits them sorted by output, then input). For blocks in row-major order the result equals
  `build_block_schedule` of their mask with the same capacity.

  Args:
    rows_Z, cols_Z: `[Z]` int block positions, possibly traced; Z, the grid and capacity static.
    grid_shape: (R, C).
    capacity: steps per pass; default and minimum `traced_capacity(Z, (R, C))`, enough for any
      mask with Z blocks (it cannot be checked against traced positions).

  Returns:
    A `BlockSchedule` of int32 jnp arrays.
  """
  num_rows, num_cols = grid_shape
  if min(num_rows, num_cols) < 1 or rows_Z.ndim != 1 or rows_Z.shape != cols_Z.shape:
    raise ValueError(f"need [Z] rows and cols and a grid of positive sides, got shapes "
                     f"{rows_Z.shape}, {cols_Z.shape} and grid_shape {grid_shape}")
  num_blocks = rows_Z.shape[0]
  if num_blocks > num_rows * num_cols:
    raise ValueError(f"{num_blocks} blocks do not fit a {num_rows}x{num_cols} grid")
  least = traced_capacity(num_blocks, grid_shape)
  capacity = least if capacity is None else capacity
  if capacity < least:
    raise ValueError(f"capacity={capacity} is below {least}, the steps a mask with "
                     f"{num_blocks} blocks on a {num_rows}x{num_cols} grid may need")
  rows_Z, cols_Z = jnp.asarray(rows_Z, jnp.int32), jnp.asarray(cols_Z, jnp.int32)
  row_order_Z = jnp.lexsort((cols_Z, rows_Z)).astype(jnp.int32)
  col_order_Z = jnp.lexsort((rows_Z, cols_Z)).astype(jnp.int32)
  return BlockSchedule(
      rows_Z=rows_Z,
      cols_Z=cols_Z,
      by_row=_traced_steps(rows_Z[row_order_Z], cols_Z[row_order_Z], row_order_Z, num_rows,
                           capacity),
      by_col=_traced_steps(cols_Z[col_order_Z], rows_Z[col_order_Z], col_order_Z, num_cols,
                           capacity),
      grid_shape=(num_rows, num_cols),
  )


def _traced_steps(out_Z: jax.Array, in_Z: jax.Array, block_Z: jax.Array, num_outputs: int,
                  capacity: int) -> BlockSteps:
  """`_build_steps` in jnp with a static number of steps: step s belongs to the output o with
  start[o] <= s < start[o + 1] (the last output for padding steps), is live if s < the step count
  and o has blocks, and reads the live block numbered (live steps before it, inclusive) - 1."""
  count_O = jnp.bincount(out_Z, length=num_outputs)
  start_O1 = jnp.concatenate([jnp.zeros(1, jnp.int32),
                              jnp.cumsum(jnp.maximum(count_O, 1)).astype(jnp.int32)])
  step_S = jnp.arange(capacity, dtype=jnp.int32)
  out_S = jnp.minimum(jnp.searchsorted(start_O1[1:], step_S, side="right"), num_outputs - 1)
  live_S = ((step_S < start_O1[-1]) & (count_O[out_S] > 0)).astype(jnp.int32)
  source_S = jnp.maximum(jnp.cumsum(live_S) - 1, 0)
  if out_Z.shape[0] == 0:
    in_S = block_S = jnp.zeros(capacity, jnp.int32)
  else:
    in_S, block_S = in_Z[source_S], block_Z[source_S]
  return BlockSteps(out_S=out_S.astype(jnp.int32), in_S=in_S.astype(jnp.int32),
                    block_S=block_S.astype(jnp.int32), live_S=live_S, start_O1=start_O1)
