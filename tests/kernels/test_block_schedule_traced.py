"""build_block_schedule_traced: under jit it equals the NumPy builder; any block order works."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_schedule import (build_block_schedule, build_block_schedule_traced,
                                    traced_capacity)

GRID = (3, 4)
# Row 1 and column 3 are empty; Z = 4, traced capacity 4 + max(3 - 1, 4 - 2) = 6.
MASK = np.array([[1, 1, 0, 0],
                 [0, 0, 0, 0],
                 [1, 0, 1, 0]], bool)


@jax.jit
def _traced(rows_Z, cols_Z):
  return build_block_schedule_traced(rows_Z, cols_Z, GRID)


def _masks():
  """The hand mask, and random masks of the same block count (one compilation)."""
  rng = np.random.default_rng(0)
  out = [MASK]
  for _ in range(5):
    flat = np.zeros(12, bool)
    flat[rng.choice(12, 4, replace=False)] = True
    out.append(flat.reshape(GRID))
  return out


def test_capacity_bound():
  assert traced_capacity(4, GRID) == 6
  assert traced_capacity(0, GRID) == 4 and traced_capacity(12, GRID) == 12


@pytest.mark.parametrize("index", range(6))
def test_jit_schedule_equals_numpy_builder(index):
  mask = _masks()[index]
  want = build_block_schedule(mask, traced_capacity(4, GRID))
  got = _traced(*map(jnp.asarray, np.nonzero(mask)))
  assert got.grid_shape == want.grid_shape
  for name in ("rows_Z", "cols_Z"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
  for pass_name in ("by_row", "by_col"):
    for field in ("out_S", "in_S", "block_S", "live_S", "start_O1"):
      np.testing.assert_array_equal(getattr(getattr(got, pass_name), field),
                                    getattr(getattr(want, pass_name), field), err_msg=field)


def test_permuted_blocks_renumber_the_steps():
  """Blocks given in order perm: the passes are the row-major ones with block z renamed to the
  position of z in perm."""
  rows_Z, cols_Z = np.nonzero(MASK)
  perm_Z = np.array([2, 0, 3, 1])
  want = build_block_schedule(MASK, traced_capacity(4, GRID))
  got = _traced(jnp.asarray(rows_Z[perm_Z]), jnp.asarray(cols_Z[perm_Z]))
  position_Z = np.argsort(perm_Z)
  for pass_name in ("by_row", "by_col"):
    g, w = getattr(got, pass_name), getattr(want, pass_name)
    np.testing.assert_array_equal(g.block_S, position_Z[w.block_S])
    for field in ("out_S", "in_S", "live_S", "start_O1"):
      np.testing.assert_array_equal(getattr(g, field), getattr(w, field))


def test_too_small_capacity_is_an_error():
  with pytest.raises(ValueError, match="capacity=5 is below 6"):
    build_block_schedule_traced(jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), GRID, 5)
