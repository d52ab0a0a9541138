"""PixelflyLinear against a dense numpy reference with a hand-built flat block butterfly mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks


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


def _case(size=8, block=2, rank=3, batch=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, size)).astype(np.float32)
  params = {"kernel": rng.normal(size=(size, size)).astype(np.float32),
            "lowrank_u": rng.normal(size=(size, rank)).astype(np.float32),
            "lowrank_v": rng.normal(size=(rank, size)).astype(np.float32),
            "bias": rng.normal(size=(size,)).astype(np.float32)}
  return x, params


def test_hand_built_pattern_is_the_layer_mask():
  expected = _butterfly_by_hand(8, 2)  # grid 4x4: kept iff r ^ c in {0, 1, 2}
  assert expected.sum() == 3 * 4 * 4  # 3 of 4 blocks per block row
  np.testing.assert_array_equal(masks.pixelfly_pattern(8, 8, block=2), expected)


def test_forward_matches_dense_numpy_reference():
  x, params = _case()
  layer = masks.PixelflyLinear(features=8, block=2, rank=3)
  y, aux = layer.apply({"params": params}, jnp.asarray(x))
  m = _butterfly_by_hand(8, 2)
  p64 = {k: v.astype(np.float64) for k, v in params.items()}
  expected = (x @ (m * p64["kernel"]) + (x @ p64["lowrank_u"]) @ p64["lowrank_v"]
              + p64["bias"])
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  assert float(aux["metrics"]["density"]) == pytest.approx(0.75)
  assert aux["losses"] == {}


def test_gradients_match_numpy_and_masked_weights_get_exact_zero():
  x, params = _case(seed=1)
  rng = np.random.default_rng(2)
  dy = rng.normal(size=(x.shape[0], 8)).astype(np.float32)  # loss = sum(y * dy)
  layer = masks.PixelflyLinear(features=8, block=2, rank=3)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, jnp.asarray(x))[0] * dy))(params)
  m = _butterfly_by_hand(8, 2)
  x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
  u, v = params["lowrank_u"].astype(np.float64), params["lowrank_v"].astype(np.float64)
  np.testing.assert_allclose(grads["kernel"], m * (x64.T @ dy64), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(grads["kernel"])[~m] == 0.0)  # exactly zero, not just small
  np.testing.assert_allclose(grads["lowrank_u"], x64.T @ (dy64 @ v.T), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads["lowrank_v"], (x64 @ u).T @ dy64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads["bias"], dy64.sum(0), rtol=1e-5, atol=1e-5)


def test_init_shapes_and_lowrank_term_starts_at_zero():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 16)), jnp.float32)
  layer = masks.PixelflyLinear(features=8, block=2, rank=2, use_bias=False)
  variables = layer.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  assert {k: v.shape for k, v in params.items()} == {
      "kernel": (16, 8), "lowrank_u": (16, 2), "lowrank_v": (2, 8)}
  y, _ = layer.apply(variables, x)
  m = masks.pixelfly_pattern(16, 8, block=2)  # grid 8x4, stretched from the 4x4 butterfly
  assert m.shape == (16, 8) and m.sum() == 3 * 8 * 2 * 2  # 3 kept blocks of 4 per block row
  np.testing.assert_allclose(y, np.asarray(x) @ (m * np.asarray(params["kernel"])), rtol=1e-5,
                             atol=1e-5)
  no_lowrank = masks.PixelflyLinear(features=8, block=2).init(jax.random.PRNGKey(0), x)
  assert sorted(no_lowrank["params"]) == ["bias", "kernel"]


@pytest.mark.parametrize("kwargs, width, message", [
    ({"features": 6, "block": 1}, 6, "power of two"),
    ({"features": 8, "block": 3}, 8, "must tile"),
    ({"features": 8, "rank": -1}, 8, "rank must be >= 0"),
])
def test_bad_settings_are_clear_errors(kwargs, width, message):
  with pytest.raises(ValueError, match=message):
    masks.PixelflyLinear(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros((1, width)))
