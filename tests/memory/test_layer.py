"""The ProductKeyMemory layer: against a NumPy/naive reference, sharded vs unsharded, in the LM."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax.memory  # noqa: F401 (registers "pkm")
from sparsejax.memory import ProductKeyMemory
from sparsejax.models import build_lm
from sparsejax.registry import FFNS
from sparsejax.sharding import logical_to_mesh_sharding, make_mesh, with_rules
from tests.memory import reference

SMALL = dict(d_model=16, num_keys=8, k=3, num_heads=2, d_key=8)


def inputs(batch=2, length=5, d_model=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, d_model)), jnp.float32)


def init(layer, x_BTD):
  return nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x_BTD))


def np_norm(q_THQ, norm_params, kind):
  """LayerNorm / RMSNorm over the last axis with (H, Q) scale (and bias), eps 1e-6."""
  q = np.asarray(q_THQ, np.float64)
  if kind == "layernorm":
    q = q - q.mean(-1, keepdims=True)
  normed = q / np.sqrt(np.mean(q**2, -1, keepdims=True) + 1e-6)
  normed = normed * np.asarray(norm_params["scale"])
  if kind == "layernorm":
    normed = normed + np.asarray(norm_params["bias"])
  return normed


def reference_layer(params, x_BTD, k, query_norm, gated):
  """The layer recomputed from its params with NumPy and the naive dense read."""
  batch, length, d_model = x_BTD.shape
  x_TD = np.asarray(x_BTD, np.float64).reshape(-1, d_model)
  q_THQ = np.einsum("td,dhq->thq", x_TD, params["query"])
  if query_norm != "none":
    q_THQ = np_norm(q_THQ, params["query_norm"], query_norm)
  y_TD, _, _ = reference.naive_read(
      jnp.asarray(q_THQ, jnp.float32), params["subkeys"], params["values"], k
  )
  y_TD = np.asarray(y_TD, np.float64)
  if gated:
    h_TD = x_TD @ np.asarray(params["w1"], np.float64)
    y_TD = (y_TD * h_TD / (1 + np.exp(-h_TD))) @ np.asarray(params["w2"], np.float64)
  return y_TD.reshape(batch, length, d_model)


@pytest.mark.parametrize(
    "query_norm, gated", [("layernorm", False), ("rmsnorm", True), ("none", False)]
)
def test_layer_matches_reference(query_norm, gated):
  layer = ProductKeyMemory(**SMALL, query_norm=query_norm, gated=gated)
  x_BTD = inputs()
  params = init(layer, x_BTD)["params"]
  rng = np.random.default_rng(1)
  for name, value in params.get("query_norm", {}).items():  # non-trivial scale and bias
    params["query_norm"][name] = jnp.asarray(rng.normal(size=value.shape), jnp.float32)
  y_BTD, aux = jax.jit(layer.apply)({"params": params}, x_BTD)
  want = reference_layer(params, x_BTD, SMALL["k"], query_norm, gated)
  np.testing.assert_allclose(y_BTD, want, rtol=1e-4, atol=1e-5)
  assert aux["losses"] == {}
  assert set(aux["metrics"]) == {"memory_usage", "access_entropy", "top_slot_share"}


def test_metrics_describe_the_batch_reads():
  layer = ProductKeyMemory(**SMALL)
  x_BTD = inputs(batch=1, length=1)
  variables = init(layer, x_BTD)
  apply = jax.jit(layer.apply)
  _, aux = apply(variables, x_BTD)
  # One token, 2 heads x k=3 reads of N=64 slots: at most 6 slots used, heads' mass sums to 2.
  usage = float(aux["metrics"]["memory_usage"])
  assert 0 < usage <= 6 / 64
  assert 1 / 6 - 1e-6 <= float(aux["metrics"]["top_slot_share"]) <= 1.0
  assert 0 < float(aux["metrics"]["access_entropy"]) <= np.log(6) / np.log(64) + 1e-6
  # The same token repeated: usage unchanged; every slot's share unchanged.
  _, aux_repeated = apply(variables, jnp.tile(x_BTD, (3, 4, 1)))
  np.testing.assert_allclose(aux_repeated["metrics"]["memory_usage"], usage)
  np.testing.assert_allclose(
      aux_repeated["metrics"]["top_slot_share"], aux["metrics"]["top_slot_share"], rtol=1e-5
  )


def test_param_shapes_and_logical_axes():
  layer = ProductKeyMemory(**SMALL, gated=True)
  boxed = jax.eval_shape(layer.init, jax.random.key(0), inputs())
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(boxed))["params"]
  assert shapes["values"] == (64, 16)
  assert shapes["subkeys"] == (2, 2, 8, 4)
  assert shapes["query"] == (16, 2, 8)
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["values"] == P("memory", "embed")
  assert specs["subkeys"] == P(None, None, None, "kv")


def test_sharded_forward_equals_unsharded():
  layer = ProductKeyMemory(d_model=16, num_keys=16, k=4, num_heads=2, d_key=8, gated=True)
  x_BTD = inputs(batch=4, length=6)
  variables = init(layer, x_BTD)
  want_BTD, want_aux = jax.jit(layer.apply)(variables, x_BTD)

  mesh = make_mesh(data=2, model=4)
  with jax.set_mesh(mesh), with_rules():
    abstract = jax.eval_shape(layer.init, jax.random.key(0), x_BTD)
    shardings = logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh)
    sharded = jax.device_put(variables, shardings)
    x_sharded = jax.device_put(x_BTD, NamedSharding(mesh, P(("data", "fsdp"), None, None)))
    y_BTD, aux = jax.jit(layer.apply)(sharded, x_sharded)

  values = sharded["params"]["values"]
  assert values.sharding.spec == P("model", "fsdp")
  assert {shard.data.shape for shard in values.addressable_shards} == {(256 // 4, 16)}
  np.testing.assert_allclose(y_BTD, want_BTD, rtol=1e-5, atol=1e-6)
  for name, value in want_aux["metrics"].items():
    np.testing.assert_allclose(aux["metrics"][name], value, rtol=1e-5, err_msg=name)


def lm_config(**ffn):
  return ml_collections.ConfigDict(dict(
      d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=8,
      ffn={"name": "pkm", "num_keys": 8, "k": 2, "num_heads": 2, "d_key": 8, **ffn},
      ffn_layers=[1],
  ))


def test_lm_with_pkm_in_one_layer_returns_memory_metrics():
  model = build_lm(lm_config(gated=True), vocab_size=32)
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
  variables = init(model, tokens_BT)
  assert "values" in variables["params"]["layer_1"]["ffn"]
  assert "wi" in variables["params"]["layer_0"]["ffn"]

  def loss(params):
    logits_BTV, aux = model.apply({"params": params}, tokens_BT)
    return jnp.mean(logits_BTV**2), (logits_BTV, aux)

  (_, (logits_BTV, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"]
  )
  assert logits_BTV.shape == (2, 8, 32) and np.all(np.isfinite(logits_BTV))
  assert set(aux["metrics"]) == {
      "layer_1/ffn/memory_usage", "layer_1/ffn/access_entropy", "layer_1/ffn/top_slot_share"
  }
  for value in aux["metrics"].values():
    assert 0 < float(value) <= 1
  for name in ("values", "subkeys", "query"):
    assert np.abs(np.asarray(grads["layer_1"]["ffn"][name])).max() > 0, name


def test_bfloat16_compute_keeps_float32_params():
  layer = ProductKeyMemory(**SMALL, dtype=jnp.bfloat16)
  x_BTD = inputs()
  variables = init(layer, x_BTD)
  y_BTD, _ = jax.jit(layer.apply)(variables, x_BTD)
  assert y_BTD.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  want = jax.jit(layer.clone(dtype=jnp.float32).apply)(variables, x_BTD)[0]
  np.testing.assert_allclose(np.asarray(y_BTD, np.float32), want, atol=0.1)


def test_registered_as_pkm():
  assert FFNS.get("pkm") is ProductKeyMemory


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(k=9), r"k must be an int in \[1, num_keys=8\].*got 9"),
        (dict(k=0), r"k must be an int in \[1, num_keys=8\].*got 0"),
        (dict(d_key=7), "d_key=7 must be even"),
        (dict(num_keys=0), "num_keys must be a positive int, got 0"),
        (dict(query_norm="batchnorm"), "query_norm='batchnorm'; allowed: layernorm, rmsnorm"),
    ],
)
def test_bad_fields_are_clear_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    ProductKeyMemory(**{**SMALL, **fields})


def test_bad_config_is_an_error_when_the_lm_is_traced():
  model = build_lm(lm_config(k=20), vocab_size=32)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, num_keys=8\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
