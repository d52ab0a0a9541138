"""gmm / tgmm: every backend against the dense reference, forward and gradients.

The dense reference is itself checked against a per-group NumPy loop. Pallas kernels run in
interpret mode (NaN where a kernel never wrote, caught by the finiteness checks), on shapes that
are not multiples of the tiles, with empty groups, one group holding every row, one-row groups
sharing a tile and rows past the groups. The XLA loop runs with a row tile that leaves the rest
of a group to its smaller windows.
"""
import hypothesis
from hypothesis import strategies as st
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gmm as gmm_lib
from tests.kernels.checks import assert_close

M, K, N = 37, 20, 12  # no dim a multiple of the test tiles
TILING = (8, 8, 8)
SIZES = {
    "ragged": [5, 0, 9, 0, 13],  # empty groups, groups sharing tiles, 10 rows past the groups
    "one_group_holds_all": [0, 0, M, 0, 0],
    "all_empty": [0, 0, 0, 0, 0],
    "single_rows": [1, 1, 1, 1, 1],
}
BACKENDS = {
    "xla": dict(implementation="xla", tiling=(32, 8, 8)),  # windows 16 to 28 below the tile
    "pallas_tpu": dict(implementation="pallas", interpret=True, tiling=TILING),
    "pallas_gpu": dict(implementation="pallas", interpret=True, tiling=(16, 16, 16),
                       platform="gpu"),
}


def _data(num_rows, contract, out_dim, groups, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  return (normal(num_rows, contract), normal(groups, contract, out_dim),
          normal(num_rows, out_dim), normal(groups, contract, out_dim))


def _numpy_gmm(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = np.asarray(lhs[start:start + size], np.float64) @ np.asarray(rhs[g])
    start += size
  return out


def _all_outputs(lhs, rhs, sizes, dy, ct, **kwargs):
  """gmm, its two gradients, tgmm and tgmm's two gradients, in one jitted call."""

  def run(lhs, rhs, dy, ct):
    y, gmm_vjp = jax.vjp(lambda a, b: gmm_lib.gmm(a, b, sizes, **kwargs), lhs, rhs)
    dw, tgmm_vjp = jax.vjp(lambda a, b: gmm_lib.tgmm(a, b, sizes, **kwargs), lhs, dy)
    return (y, *gmm_vjp(dy), dw, *tgmm_vjp(ct))

  return jax.jit(run)(lhs, rhs, dy, ct)


NAMES = ("y", "dlhs", "drhs", "tgmm", "tgmm_dlhs", "tgmm_dgrad")


def _check_against_reference(lhs, rhs, sizes, dy, ct, **kwargs):
  expected = _all_outputs(lhs, rhs, sizes, dy, ct, implementation="reference")
  actual = _all_outputs(lhs, rhs, sizes, dy, ct, **kwargs)
  for name, a, e in zip(NAMES, actual, expected):
    assert a.dtype == e.dtype, name
    assert_close(a, e, name)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_reference_matches_per_group_loop(name):
  lhs, rhs, _, _ = _data(M, K, N, 5)
  sizes = np.array(SIZES[name], np.int32)
  assert_close(gmm_lib.gmm_reference(lhs, rhs, sizes), _numpy_gmm(lhs, rhs, sizes))


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_matches_reference_with_gradients(backend, name):
  lhs, rhs, dy, ct = _data(M, K, N, 5)
  _check_against_reference(lhs, rhs, jnp.array(SIZES[name], jnp.int32), dy, ct,
                           **BACKENDS[backend])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bfloat16(backend):
  lhs, rhs, dy, ct = _data(M, K, N, 5, jnp.bfloat16)
  _check_against_reference(lhs, rhs, jnp.array(SIZES["ragged"], jnp.int32), dy, ct,
                           **BACKENDS[backend])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_rows_past_the_groups_are_ignored_even_if_not_finite(backend):
  """NaN / inf in rows of no group change nothing: every backend masks both tgmm operands."""
  lhs, rhs, dy, ct = _data(M, K, N, 5)
  sizes = jnp.array(SIZES["ragged"], jnp.int32)
  past_M1 = (jnp.arange(M) >= jnp.sum(sizes))[:, None]
  expected = _all_outputs(jnp.where(past_M1, 0, lhs), rhs, sizes, jnp.where(past_M1, 0, dy), ct,
                          implementation="reference")
  actual = _all_outputs(jnp.where(past_M1, jnp.nan, lhs), rhs, sizes,
                        jnp.where(past_M1, jnp.inf, dy), ct, **BACKENDS[backend])
  for name, a, e in zip(NAMES, actual, expected):
    assert_close(a, e, name)


def test_tpu_kernels_under_the_tpu_simulator():
  """The TPU simulator models VMEM buffers and pipelining: revisits of an output tile must be
  consecutive and every row of a revisited tile must end up written."""
  lhs, rhs, dy, ct = _data(M, K, N, 5, seed=3)
  with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
    _check_against_reference(lhs, rhs, jnp.array(SIZES["ragged"], jnp.int32), dy, ct,
                             implementation="pallas", interpret=True, tiling=(16, 16, 8))


@hypothesis.settings(max_examples=6, deadline=None, database=None)
@hypothesis.given(
    num_rows=st.integers(1, 40), contract=st.integers(1, 9), out_dim=st.integers(1, 9),
    tile=st.integers(1, 48), data=st.data())
def test_xla_random_shapes_and_sizes(num_rows, contract, out_dim, tile, data):
  groups = data.draw(st.integers(1, 6))
  # Sizes summing to less than, exactly, or more than M (rows past M are cut off).
  sizes = data.draw(st.lists(st.integers(0, num_rows), min_size=groups, max_size=groups))
  lhs, rhs, dy, ct = _data(num_rows, contract, out_dim, groups, seed=num_rows)
  _check_against_reference(lhs, rhs, jnp.array(sizes, jnp.int32), dy, ct, implementation="xla",
                           tiling=(tile, 8, 8))


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@hypothesis.settings(max_examples=3, deadline=None, database=None)
@hypothesis.given(data=st.data())
def test_pallas_random_shapes_and_sizes(backend, data):
  num_rows, contract, out_dim = (data.draw(st.integers(1, 40)) for _ in range(3))
  groups = data.draw(st.integers(1, 6))
  sizes = data.draw(st.lists(st.integers(0, num_rows), min_size=groups, max_size=groups))
  lhs, rhs, dy, ct = _data(num_rows, contract, out_dim, groups, seed=num_rows)
  _check_against_reference(lhs, rhs, jnp.array(sizes, jnp.int32), dy, ct, **BACKENDS[backend])


def test_xla_window_sizes_hold_every_rest_with_little_waste():
  assert gmm_lib.xla_window_sizes(1000, 128) == (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96,
                                                 112, 128)
  assert gmm_lib.xla_window_sizes(37, 64) == (16, 20, 24, 28, 32, 37)  # capped at the rows
  assert gmm_lib.xla_window_sizes(37, 8) == (8,)
  sizes = gmm_lib.xla_window_sizes(1000, 200)
  for rest in range(201):
    assert min(s for s in sizes if s >= rest) <= max(16, 1.25 * rest)


@hypothesis.settings(max_examples=15, deadline=None, database=None)
@hypothesis.given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6), num_rows=st.integers(1, 60),
    tile=st.integers(1, 16), visit_empty=st.booleans(), tail=st.booleans())
def test_group_tiles_cover_each_row_once(sizes, num_rows, tile, visit_empty, tail):
  make = jax.jit(gmm_lib.make_group_tiles, static_argnums=(1, 2),
                 static_argnames=("visit_empty_groups", "tail_group"))
  plan = make(jnp.array(sizes, jnp.int32), num_rows, tile, visit_empty_groups=visit_empty,
              tail_group=tail)
  num_tiles = -(-num_rows // tile)
  num_groups = len(sizes) + tail
  assert plan.group_S.shape == (num_tiles + num_groups - 1,)
  group_S, tile_S = np.asarray(plan.group_S), np.asarray(plan.tile_S)
  starts, ends = np.asarray(plan.starts_G), np.asarray(plan.ends_G)
  num_steps = int(plan.num_steps)
  assert np.all(np.diff(group_S) >= 0) and np.all(np.diff(tile_S[:num_steps]) >= 0)
  assert np.all(group_S[num_steps:] == group_S[max(num_steps - 1, 0)])
  covered = np.zeros(num_tiles * tile, int)
  for g, t in zip(group_S[:num_steps], tile_S[:num_steps]):
    rows = np.arange(t * tile, (t + 1) * tile)
    covered[rows[(rows >= starts[g]) & (rows < ends[g])]] += 1
  owned = np.zeros_like(covered)
  for start, end in zip(starts, ends):
    owned[start:end] += 1
  np.testing.assert_array_equal(covered, owned)
  assert owned.max(initial=1) == 1
  if tail:
    assert np.all(owned == 1)
  if visit_empty:
    assert set(group_S[:num_steps]) == set(range(num_groups))


def test_zero_rows():
  lhs, rhs = jnp.zeros((0, 3)), jnp.ones((2, 3, 4))
  assert gmm_lib.gmm(lhs, rhs, jnp.array([0, 0], jnp.int32)).shape == (0, 4)
  assert_close(gmm_lib.tgmm(lhs, jnp.zeros((0, 4)), jnp.array([0, 0], jnp.int32)),
               jnp.zeros((2, 3, 4)))


@pytest.mark.parametrize("call,match", [
    (lambda: gmm_lib.gmm(jnp.ones((4,)), jnp.ones((1, 3, 2)), jnp.array([4])),
     r"lhs must be \[M, K\], got shape \(4,\)"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.array([4])),
     r"rhs must be \[G, K, N\] = \[1, 3, N\]"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), jnp.array([4.0])),
     r"group_sizes must be a non-empty int vector \[G\], got dtype float32"),
    (lambda: gmm_lib.tgmm(jnp.ones((4, 3)), jnp.ones((5, 2)), jnp.array([4])),
     r"grad must be \[M, N\] with M = 4"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), jnp.array([4]), tiling=(8, 8)),
     r"tiling must be three positive ints"),
    (lambda: gmm_lib.gmm(jnp.ones((4, 3)), jnp.ones((1, 3, 2)), jnp.array([4]),
                         implementation="pallas", platform="gpu", tiling=(24, 16, 16)),
     r"the GPU kernel needs tiling in powers of two, got \(24, 16, 16\)"),
    (lambda: gmm_lib.tgmm(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.array([4]),
                          implementation="pallas", platform="tpu", tiling=(16, 128, 64)),
     r"the TPU kernel needs tiling in multiples of \(16, 128, 128\), got \(16, 128, 64\)"),
])
def test_bad_arguments_are_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
