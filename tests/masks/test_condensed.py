"""Condensed constant-fan-in matmul and layer against a naive loop and the masked dense layer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import masks as bench_masks
from sparsejax.masks import condensed, export, structures


def _case(inputs=12, outputs=5, keep=3, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(inputs, keep, replace=False) for _ in range(outputs)])
  values = rng.normal(size=(outputs, keep)).astype(np.float32)
  x = rng.normal(size=(batch, inputs)).astype(np.float32)
  return x, values, idx


def _naive(x, values, idx):
  y = np.zeros((x.shape[0], values.shape[0]), np.float64)
  for b in range(x.shape[0]):
    for o in range(values.shape[0]):
      for k in range(values.shape[1]):
        y[b, o] += x[b, idx[o, k]] * values[o, k]
  return y


@pytest.mark.parametrize("implementation", ["gather", "densify", "auto"])
def test_condensed_matmul_matches_naive_loop(implementation):
  x, values, idx = _case()
  y = condensed.condensed_matmul(jnp.asarray(x), jnp.asarray(values),
                                 jnp.asarray(idx, jnp.int16), implementation)
  np.testing.assert_allclose(y, _naive(x, values, idx), rtol=1e-5, atol=1e-5)
  y1 = condensed.condensed_matmul(jnp.asarray(x[0]), jnp.asarray(values), jnp.asarray(idx))
  np.testing.assert_allclose(y1, _naive(x[:1], values, idx)[0], rtol=1e-5, atol=1e-5)


def test_condensed_gradients_equal_masked_dense_gradients():
  x, values, idx = _case(batch=2)
  w, mask = export.from_condensed(values, idx, 12)

  def loss_condensed(x, v, impl):
    return jnp.sum(jnp.sin(condensed.condensed_matmul(x, v, jnp.asarray(idx), impl)))

  dx_dense, dw_dense = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x, w)
  want_dvalues = np.stack([np.asarray(dw_dense)[idx[o], o] for o in range(5)])
  for impl in ("gather", "densify"):
    dx, dvalues = jax.grad(loss_condensed, argnums=(0, 1))(x, values, impl)
    np.testing.assert_allclose(dx, dx_dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dvalues, want_dvalues, rtol=1e-5, atol=1e-5)


def test_condensed_linear_equals_masked_dense_layer():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  mask = np.asarray(structures.select("fan_in", np.abs(w), 0.25))
  values, idx = export.to_condensed(w, mask)
  layer = condensed.CondensedLinear(idx=idx, in_features=16)
  x = rng.normal(size=(3, 2, 16)).astype(np.float32)
  params = layer.init(jax.random.key(0), x)
  assert params["params"]["values"].shape == (8, 4)
  params = {"params": {"values": jnp.asarray(values), "bias": jnp.arange(8.0)}}
  y, aux = layer.apply(params, x)
  dense_y, _ = nn.Dense(8).apply({"params": {"kernel": np.where(mask, w, 0),
                                             "bias": np.arange(8.0)}}, x), None
  np.testing.assert_allclose(y, dense_y, rtol=1e-5, atol=1e-5)
  assert y.shape == (3, 2, 8) and float(aux["metrics"]["density"]) == 0.25
  with pytest.raises(ValueError, match="in_features=16"):
    layer.apply(params, x[..., :8])


def test_condensed_errors():
  x, values, idx = _case()
  with pytest.raises(ValueError, match="implementation"):
    condensed.condensed_matmul(x, values, idx, "sparse_magic")
  with pytest.raises(ValueError, match=r"\[O, K\]"):
    condensed.condensed_matmul(x, values, idx[:, :2])


def test_prepare_inference_caches_the_explicit_dense_kernel_for_large_batches():
  x, values, idx = _case(batch=condensed.GATHER_MAX_BATCH + 1)
  layer = condensed.CondensedLinear(idx=idx, in_features=12, use_bias=False)
  params = {"params": {"values": jnp.asarray(values)}}
  assert condensed.CACHE_COLLECTION not in layer.init(jax.random.key(0), x)
  variables = condensed.prepare_inference(layer, params, x[:1])
  want_IO = np.zeros((12, 5), np.float32)  # w[idx[o, k], o] = values[o, k], by hand
  for o in range(5):
    for k in range(3):
      want_IO[idx[o, k], o] = values[o, k]
  np.testing.assert_array_equal(variables[condensed.CACHE_COLLECTION]["kernel_IO"], want_IO)
  np.testing.assert_allclose(layer.apply(variables, x)[0], _naive(x, values, idx), rtol=1e-5,
                             atol=1e-5)
  # The large batch reads the cache (zeroed: y = 0); a single row still gathers the values.
  zeroed = {**variables, condensed.CACHE_COLLECTION: {"kernel_IO": jnp.zeros((12, 5))}}
  assert np.all(np.asarray(layer.apply(zeroed, x)[0]) == 0)
  np.testing.assert_allclose(layer.apply(zeroed, x[:1])[0], _naive(x[:1], values, idx),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="dense_IO must be"):
    condensed.condensed_matmul(x, values, idx, "densify", jnp.zeros((5, 12)))


def test_bench_functions_agree():
  layer = bench_masks.make_layer(64, 0.1)
  assert np.all(layer["mask"].sum(axis=0) == round(0.1 * 64))
  variables, condensed_forward = bench_masks.condensed_inference(layer)
  for batch in (1, 16):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 64)), jnp.float32)
    np.testing.assert_allclose(condensed_forward(variables, x),
                               bench_masks.dense_forward(x, jnp.asarray(layer["masked"])),
                               rtol=1e-5, atol=1e-5)
