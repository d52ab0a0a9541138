"""block_sparse_matmul: every backend against the dense reference, forward and gradients.

The reference is checked against NumPy on a weight built independently from the mask. Pallas
kernels run in interpret mode (NaN where a kernel never wrote, caught by the finiteness checks),
with M not a multiple of the row tile, and masks with empty block rows and columns.
"""
import hypothesis
from hypothesis import strategies as st
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse
from kernels.block_schedule import build_block_schedule
from tests.kernels.checks import assert_close

M, R, C, BK, BN = 37, 5, 4, 8, 16


def _mask(density: float, seed: int = 0) -> np.ndarray:
  """An [R, C] mask with round(density R C) blocks; below 100 % the last row and column are
  empty, so kernels must write zeros for an output with no block."""
  mask = np.zeros((R, C), bool)
  count = round(density * R * C)
  if count == R * C:
    return ~mask
  cells = np.random.default_rng(seed).choice((R - 1) * (C - 1), count, replace=False)
  mask[cells // (C - 1), cells % (C - 1)] = True
  return mask


DENSITIES = {"d0": 0.0, "d5": 0.05, "d50": 0.5, "d100": 1.0}
BACKENDS = {
    "xla_loop": (dict(implementation="xla"), 1.0),
    "xla_dense": (dict(implementation="xla"), 0.0),
    "pallas_tpu": (dict(implementation="pallas", interpret=True, tile_m=16), None),
    "pallas_gpu": (dict(implementation="pallas", interpret=True, tile_m=16, platform="gpu"),
                   None),
}


def _data(mask, dtype=jnp.float32, num_rows=M, block_shape=(BK, BN), seed=0):
  """x, the stored blocks, dy, and the dense weight built from the mask without the schedule."""
  rng = np.random.default_rng(seed)
  bk, bn = block_shape
  w_KN = rng.normal(size=(mask.shape[0] * bk, mask.shape[1] * bn))
  w_KN *= np.kron(mask, np.ones(block_shape))
  w_KN = np.asarray(jnp.asarray(w_KN, dtype).astype(jnp.float32))
  blocks = [w_KN[r * bk:(r + 1) * bk, c * bn:(c + 1) * bn] for r, c in zip(*np.nonzero(mask))]
  blocks_Zkn = jnp.asarray(np.array(blocks).reshape(-1, bk, bn), dtype)
  x_MK = jnp.asarray(rng.normal(size=(num_rows, w_KN.shape[0])), dtype)
  dy_MN = jnp.asarray(rng.normal(size=(num_rows, w_KN.shape[1])), dtype)
  return x_MK, blocks_Zkn, dy_MN, w_KN


def _forward_backward(x_MK, blocks_Zkn, schedule, dy_MN, **kwargs):
  def run(x_MK, blocks_Zkn, schedule, dy_MN):
    y_MN, vjp = jax.vjp(
        lambda x, b: block_sparse.block_sparse_matmul(x, b, schedule, **kwargs), x_MK,
        blocks_Zkn)
    return (y_MN, *vjp(dy_MN))

  return jax.jit(run)(x_MK, blocks_Zkn, schedule, dy_MN)


def _check_against_reference(mask, dtype=jnp.float32, **kwargs):
  x_MK, blocks_Zkn, dy_MN, _ = _data(mask, dtype)
  schedule = build_block_schedule(mask)
  expected = _forward_backward(x_MK, blocks_Zkn, schedule, dy_MN, implementation="reference")
  actual = _forward_backward(x_MK, blocks_Zkn, schedule, dy_MN, **kwargs)
  for name, a, e in zip(("y", "dx", "dblocks"), actual, expected):
    assert a.dtype == e.dtype, name
    assert_close(a, e, name)
  return actual


@pytest.mark.parametrize("density", sorted(DENSITIES))
def test_reference_matches_numpy(density):
  mask = _mask(DENSITIES[density])
  x_MK, blocks_Zkn, _, w_KN = _data(mask)
  y_MN = block_sparse.block_sparse_matmul_reference(x_MK, blocks_Zkn, build_block_schedule(mask))
  assert_close(y_MN, np.asarray(x_MK, np.float64) @ w_KN)


@pytest.mark.parametrize("density", sorted(DENSITIES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_matches_reference_with_gradients(backend, density, monkeypatch):
  kwargs, dense_above = BACKENDS[backend]
  if dense_above is not None:
    monkeypatch.setattr(block_sparse, "DENSE_ABOVE", dense_above)
  mask = _mask(DENSITIES[density])
  y_MN, dx_MK, _ = _check_against_reference(mask, **kwargs)
  assert np.all(np.asarray(y_MN).reshape(M, C, BN)[:, ~mask.any(0)] == 0)
  assert np.all(np.asarray(dx_MK).reshape(M, R, BK)[:, ~mask.any(1)] == 0)


@pytest.mark.parametrize("backend", ["xla_loop", "pallas_tpu", "pallas_gpu"])
def test_bfloat16(backend):
  _check_against_reference(_mask(0.5, seed=1), jnp.bfloat16, **BACKENDS[backend][0])


def test_tpu_kernels_under_the_tpu_simulator():
  """The TPU simulator models VMEM buffers and pipelining (consecutive revisits only)."""
  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    _check_against_reference(_mask(0.5, seed=2), implementation="pallas", interpret=True,
                             tile_m=32)


@hypothesis.settings(max_examples=6, deadline=None, database=None)
@hypothesis.given(
    num_rows=st.integers(1, 20), grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    block_shape=st.tuples(st.integers(1, 5), st.integers(1, 5)), data=st.data())
def test_xla_random_masks_and_shapes(num_rows, grid, block_shape, data):
  mask = np.array(data.draw(st.lists(st.booleans(), min_size=grid[0] * grid[1],
                                     max_size=grid[0] * grid[1]))).reshape(grid)
  x_MK, blocks_Zkn, dy_MN, w_KN = _data(mask, num_rows=num_rows, block_shape=block_shape)
  schedule = build_block_schedule(mask)
  y_MN, dx_MK, dblocks_Zkn = _forward_backward(x_MK, blocks_Zkn, schedule, dy_MN,
                                               implementation="xla")
  x64, dy64 = np.asarray(x_MK, np.float64), np.asarray(dy_MN, np.float64)
  assert_close(y_MN, x64 @ w_KN, "y")
  assert_close(dx_MK, dy64 @ w_KN.T, "dx")
  dw_KN = (x64.T @ dy64).reshape(grid[0], block_shape[0], grid[1], block_shape[1])
  assert_close(dblocks_Zkn, dw_KN.transpose(0, 2, 1, 3)[mask], "dblocks")


def test_zero_rows():
  mask = _mask(0.5)
  _, blocks_Zkn, _, _ = _data(mask)
  y_MN = block_sparse.block_sparse_matmul(jnp.zeros((0, R * BK)), blocks_Zkn,
                                          build_block_schedule(mask))
  assert y_MN.shape == (0, C * BN)


@pytest.mark.parametrize("kwargs,match", [
    (dict(blocks=np.ones((3, BK, BN))), r"blocks must be \[Z, bk, bn\] with Z = 10"),
    (dict(x=np.ones((M, R * BK + 1))), r"x must be \[M, 40\] \(R bk = 5 x 8\)"),
    (dict(tile_m=0), r"tile_m must be >= 1, got 0"),
    (dict(implementation="pallas", platform="tpu"),
     r"the TPU kernel needs block dims that are multiples of 128, got \(8, 16\)"),
    (dict(implementation="pallas", platform="gpu"),
     r"the GPU kernel needs block dims that are powers of two >= 16, got \(8, 16\)"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
  mask = _mask(0.5)
  x_MK, blocks_Zkn, _, _ = _data(mask)
  x_MK, blocks_Zkn = kwargs.pop("x", x_MK), kwargs.pop("blocks", blocks_Zkn)
  with pytest.raises(ValueError, match=match):
    block_sparse.block_sparse_matmul(x_MK, blocks_Zkn, build_block_schedule(mask), **kwargs)
