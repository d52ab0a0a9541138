"""BlockSchedule: a hand-worked mask, properties over random masks, capacity and errors."""
import hypothesis
from hypothesis.extra import numpy as hnp
import jax
import numpy as np
import pytest

from kernels.block_schedule import build_block_schedule, default_capacity

# Blocks (row-major): z0 = (0, 0), z1 = (2, 0), z2 = (2, 1); row 1 and column 2 are empty.
MASK = np.array([[1, 0, 0],
                 [0, 0, 0],
                 [1, 1, 0]], bool)


def test_hand_worked_mask():
  s = build_block_schedule(MASK)
  assert s.grid_shape == (3, 3) and s.num_blocks == 3 and s.capacity == 6
  assert s.density == pytest.approx(3 / 9)
  np.testing.assert_array_equal(s.rows_Z, [0, 2, 2])
  np.testing.assert_array_equal(s.cols_Z, [0, 0, 1])
  # by_row: row 0 -> z0; row 1 empty (dead step); row 2 -> z1, z2; then 2 padding steps.
  np.testing.assert_array_equal(s.by_row.out_S, [0, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(s.by_row.in_S, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(s.by_row.block_S, [0, 0, 1, 2, 2, 2])
  np.testing.assert_array_equal(s.by_row.live_S, [1, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(s.by_row.start_O1, [0, 1, 2, 4])
  # by_col: column 0 -> z0, z1; column 1 -> z2; column 2 empty; then 2 padding steps.
  np.testing.assert_array_equal(s.by_col.out_S, [0, 0, 1, 2, 2, 2])
  np.testing.assert_array_equal(s.by_col.in_S, [0, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(s.by_col.block_S, [0, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(s.by_col.live_S, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(s.by_col.start_O1, [0, 2, 3, 4])


def _check_pass(steps, out_Z, in_Z, num_outputs, num_blocks):
  """Live steps list each output's blocks once, sorted by output; every output has a step."""
  live = steps.live_S.astype(bool)
  num_steps = int(steps.start_O1[-1])
  assert np.all(np.diff(steps.out_S) >= 0)
  assert not live[num_steps:].any()
  assert np.all(steps.out_S[num_steps:] == steps.out_S[num_steps - 1])
  assert np.all(steps.block_S[num_steps:] == steps.block_S[num_steps - 1])
  for o in range(num_outputs):
    own = np.arange(steps.start_O1[o], steps.start_O1[o + 1])
    assert own.size >= 1 and np.all(steps.out_S[own] == o)
    blocks = steps.block_S[own][live[own]]
    np.testing.assert_array_equal(np.sort(blocks), np.flatnonzero(out_Z == o))
    np.testing.assert_array_equal(steps.in_S[own][live[own]], in_Z[blocks])
    assert live[own].all() or own.size == 1
  assert np.all((steps.block_S >= 0) & (steps.block_S < max(num_blocks, 1)))
  assert np.all(steps.in_S >= 0)


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, max_side=7)))
def test_passes_cover_each_block_once(mask_RC):
  s = build_block_schedule(mask_RC)
  num_rows, num_cols = mask_RC.shape
  dense = np.zeros_like(mask_RC)
  dense[s.rows_Z, s.cols_Z] = True
  np.testing.assert_array_equal(dense, mask_RC)
  assert np.all(np.diff(s.rows_Z * num_cols + s.cols_Z) > 0)  # row-major order
  assert s.capacity == default_capacity(s.num_blocks, mask_RC.shape)
  _check_pass(s.by_row, s.rows_Z, s.cols_Z, num_rows, s.num_blocks)
  _check_pass(s.by_col, s.cols_Z, s.rows_Z, num_cols, s.num_blocks)
  assert all(leaf.dtype == np.int32 for leaf in jax.tree.leaves(s))


def test_capacity_pads_and_too_small_is_an_error():
  s = build_block_schedule(MASK, capacity=10)
  assert s.by_row.out_S.shape == s.by_col.out_S.shape == (10,)
  assert build_block_schedule(MASK, capacity=4).capacity == 4  # 3 blocks + 1 empty row/column
  with pytest.raises(ValueError, match=r"capacity=3 is below the 4 steps"):
    build_block_schedule(MASK, capacity=3)


@pytest.mark.parametrize("mask", [np.ones((2, 2), np.int32), np.ones(4, bool),
                                  np.ones((0, 3), bool)])
def test_bad_masks_are_errors(mask):
  with pytest.raises(ValueError, match="block mask must be a non-empty 2-D bool array"):
    build_block_schedule(mask)


def test_is_a_pytree_with_static_grid_shape():
  s = build_block_schedule(MASK)
  assert len(jax.tree.leaves(s)) == 2 + 2 * 5
  doubled = jax.jit(lambda s: jax.tree.map(lambda a: 2 * a, s))(s)
  assert doubled.grid_shape == (3, 3)
  np.testing.assert_array_equal(doubled.rows_Z, 2 * s.rows_Z)
