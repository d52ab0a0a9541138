"""grouped_matmul against a per-group numpy loop and jax.grad of a dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.moe.gmm import grouped_matmul

M, D, F, E = 23, 5, 7, 4
SIZES = {
    "ragged": [7, 0, 11, 5],
    "one_group_all_rows": [0, 0, M, 0],
    "all_empty": [0, 0, 0, 0],
    "rows_past_groups": [3, 4, 0, 6],
    "single_rows": [1, 1, 1, 1],
}


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(M, D)).astype(np.float32),
          rng.normal(size=(E, D, F)).astype(np.float32))


def _numpy_reference(x, w, sizes):
  y = np.zeros((x.shape[0], w.shape[2]), np.float64)
  start = 0
  for e, size in enumerate(sizes):
    y[start:start + size] = x[start:start + size].astype(np.float64) @ w[e]
    start += size
  return y


def _dense_reference(x, w, sizes):
  """Every row times its group's weight via a gathered [M, D, F] stack; rows past groups 0."""
  group_M = np.repeat(np.arange(E), sizes)
  rows = group_M.size
  y = jnp.einsum("md,mdf->mf", x[:rows], w[group_M])
  return jnp.concatenate([y, jnp.zeros((x.shape[0] - rows, w.shape[2]), y.dtype)])


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("tile,min_tile", [(1, 1), (12, 5), (128, 16)])
def test_matches_per_group_numpy(name, tile, min_tile):
  x, w = _data()
  sizes = np.array(SIZES[name], np.int32)
  y = jax.jit(grouped_matmul, static_argnames=("tile", "min_tile"))(
      x, w, sizes, tile=tile, min_tile=min_tile)
  np.testing.assert_allclose(y, _numpy_reference(x, w, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_gradients_match_dense_reference(name):
  x, w = _data(1)
  sizes = np.array(SIZES[name], np.int32)
  cotangent = np.random.default_rng(2).normal(size=(M, F)).astype(np.float32)

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.tanh(fn(x, w)) * cotangent)

  gmm = lambda x, w: grouped_matmul(x, w, sizes, tile=8, min_tile=2)
  grads = jax.jit(jax.grad(loss(gmm), (0, 1)))(x, w)
  expected = jax.grad(loss(lambda x, w: _dense_reference(x, w, sizes)), (0, 1))(x, w)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  x, w = _data(3)
  sizes = np.array(SIZES["ragged"], np.int32)
  y = grouped_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), sizes, tile=8,
                     min_tile=4)
  assert y.dtype == jnp.bfloat16
  rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, w)]
  np.testing.assert_allclose(np.asarray(y, np.float32), _numpy_reference(*rounded, sizes),
                             rtol=2e-2, atol=2e-2)


def test_rejects_mismatched_shapes():
  x, w = _data()
  with pytest.raises(ValueError, match="group_sizes must have shape \\(4,\\)"):
    grouped_matmul(x, w, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="needs x \\[M, D\\] and w \\[E, D, F\\]"):
    grouped_matmul(x[:, :3], w, np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="tile and min_tile must be >= 1, got tile=0"):
    grouped_matmul(x, w, np.zeros(4, np.int32), tile=0)


def test_empty_rows_give_empty_output():
  _, w = _data()
  y = grouped_matmul(np.zeros((0, D), np.float32), w, np.zeros(E, np.int32))
  assert y.shape == (0, F)
