"""PixelflyLinear against a dense numpy reference with a hand-built flat block butterfly mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks
from sparsejax.masks import pixelfly


def _butterfly_by_hand(size, block):
  """Square flat block butterfly, all levels: block (r, c) kept iff r == c or |r - c| is a power
  of two with r, c differing in exactly that one bit (r xor c a power of two), built by loops."""
  grid = size // block
  keep = np.zeros((size, size), bool)
  for r in range(grid):
    for c in range(grid):
      diff_bits = [bit for bit in range(8) if (r >> bit) & 1 != (c >> bit) & 1]
      if len(diff_bits) <= 1:
        keep[r * block:(r + 1) * block, c * block:(c + 1) * block] = True
  return keep


def _dense_from_blocks(blocks, mask_nn, block_shape):
  """The explicit dense W: stored block z (row-major over True cells of mask_nn) at its cell."""
  bk, bn = block_shape
  w = np.zeros((mask_nn.shape[0] * bk, mask_nn.shape[1] * bn), np.float64)
  cells = [(r, c) for r in range(mask_nn.shape[0]) for c in range(mask_nn.shape[1])
           if mask_nn[r, c]]
  for z, (r, c) in enumerate(cells):
    w[r * bk:(r + 1) * bk, c * bn:(c + 1) * bn] = blocks[z]
  return w


def _case(inputs=8, outputs=8, block=2, rank=3, batch=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, inputs)).astype(np.float32)
  mask_nn, block_shape = pixelfly.pixelfly_blocks(inputs, outputs, block)
  params = {"blocks": rng.normal(size=(int(mask_nn.sum()),) + block_shape).astype(np.float32),
            "lowrank_u": rng.normal(size=(inputs, rank)).astype(np.float32),
            "lowrank_v": rng.normal(size=(rank, outputs)).astype(np.float32),
            "bias": rng.normal(size=(outputs,)).astype(np.float32)}
  return x, params, _dense_from_blocks(params["blocks"], mask_nn, block_shape)


def test_blocks_tile_the_hand_built_pattern():
  mask_nn, block_shape = pixelfly.pixelfly_blocks(8, 8, block=2)
  assert block_shape == (2, 2)
  np.testing.assert_array_equal(np.kron(mask_nn, np.ones(block_shape, bool)),
                                _butterfly_by_hand(8, 2))
  # A 16 x 8 kernel with 2 x 2 blocks has an 8 x 4 grid: the 4 x 4 butterfly on 4 x 2 blocks.
  mask_nn, block_shape = pixelfly.pixelfly_blocks(16, 8, block=2)
  assert mask_nn.shape == (4, 4) and block_shape == (4, 2)
  np.testing.assert_array_equal(np.kron(mask_nn, np.ones(block_shape, bool)),
                                masks.pixelfly_pattern(16, 8, block=2))


@pytest.mark.parametrize("inputs, outputs", [(8, 8), (16, 8)])
def test_forward_and_gradients_match_the_explicit_dense_matrix(inputs, outputs):
  x, params, w = _case(inputs, outputs, seed=inputs)
  dense_mask = masks.pixelfly_pattern(inputs, outputs, block=2)
  assert np.all(w[~dense_mask] == 0) and np.all(w[dense_mask] != 0)
  layer = masks.PixelflyLinear(features=outputs, block=2, rank=3)
  dy = np.random.default_rng(1).normal(size=(x.shape[0], outputs))  # loss = sum(y * dy)

  def loss(p, x):
    y, aux = layer.apply({"params": p}, x)
    return jnp.sum(y * dy), (y, aux)

  (dparams, dx), (y, aux) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))
  x64, p64 = x.astype(np.float64), {k: v.astype(np.float64) for k, v in params.items()}
  u, v = p64["lowrank_u"], p64["lowrank_v"]
  np.testing.assert_allclose(np.asarray(y), x64 @ w + (x64 @ u) @ v + p64["bias"], rtol=1e-5,
                             atol=1e-5)
  assert float(aux["metrics"]["density"]) == pytest.approx(0.75) and aux["losses"] == {}
  mask_nn, block_shape = pixelfly.pixelfly_blocks(inputs, outputs, block=2)
  dw = dense_mask * (x64.T @ dy)  # the dense masked layer's kernel gradient
  np.testing.assert_allclose(_dense_from_blocks(dparams["blocks"], mask_nn, block_shape), dw,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dy @ (w + u @ v).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams["lowrank_u"], x64.T @ (dy @ v.T), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams["lowrank_v"], (x64 @ u).T @ dy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams["bias"], dy.sum(0), rtol=1e-5, atol=1e-5)


def test_init_stores_only_the_kept_blocks_and_the_lowrank_term_starts_at_zero():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 16)), jnp.float32)
  layer = masks.PixelflyLinear(features=8, block=2, rank=2, use_bias=False)
  variables = layer.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  assert {k: v.shape for k, v in params.items()} == {
      "blocks": (12, 4, 2), "lowrank_u": (16, 2), "lowrank_v": (2, 8)}  # 3 of 4 per block row
  y, _ = layer.apply(variables, x)
  mask_nn, block_shape = pixelfly.pixelfly_blocks(16, 8, block=2)
  w = _dense_from_blocks(np.asarray(params["blocks"]), mask_nn, block_shape)
  assert y.shape == (2, 2, 8)
  np.testing.assert_allclose(y, np.asarray(x) @ w, rtol=1e-5, atol=1e-5)
  no_lowrank = masks.PixelflyLinear(features=8, block=2).init(jax.random.PRNGKey(0), x)
  assert sorted(no_lowrank["params"]) == ["bias", "blocks"]


@pytest.mark.parametrize("kwargs, width, message", [
    ({"features": 6, "block": 1}, 6, "power of two"),
    ({"features": 8, "block": 3}, 8, "must tile"),
    ({"features": 8, "rank": -1}, 8, "rank must be >= 0"),
])
def test_bad_settings_are_clear_errors(kwargs, width, message):
  with pytest.raises(ValueError, match=message):
    masks.PixelflyLinear(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros((1, width)))
