"""One value table shared by the memory layers of several blocks; value sharding errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sparsejax.memory import ProductKeyMemory, optim
from sparsejax.models import build_lm
from sparsejax.sharding import make_mesh, with_rules

LAYERS = ("layer_0", "layer_2")


def lm(shared, ffn="pkm"):
  config = ml_collections.ConfigDict(dict(
      d_model=16, num_layers=3, num_heads=2, d_ff=32, max_len=8,
      ffn={"name": ffn, **({"num_keys": 6, "k": 3, "num_heads": 2, "d_key": 8}
                           if ffn == "pkm" else {})},
      ffn_layers=[0, 2], shared_memory_values=shared,
  ))
  return build_lm(config, vocab_size=32)


def test_layers_read_one_table_and_its_gradient_sums_theirs():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
  shared_model = lm(True)
  boxed = shared_model.init(jax.random.key(0), tokens)
  assert nn.get_partition_spec(boxed)["params"]["shared_memory_values"] == P("memory", "embed")
  params = nn.meta.unbox(boxed)["params"]
  assert params["shared_memory_values"].shape == (36, 16)
  for layer in LAYERS:
    assert "values" not in params[layer]["ffn"] and "subkeys" in params[layer]["ffn"]
  # Naive reference: the per-layer-table model with both tables set to the shared one.
  table = params["shared_memory_values"]
  separate = {k: v for k, v in params.items() if k != "shared_memory_values"}
  for layer in LAYERS:
    separate[layer] = {**separate[layer], "ffn": {**separate[layer]["ffn"], "values": table}}

  def loss(model, p):
    logits, _ = model.apply({"params": p}, tokens)
    return jnp.mean(jnp.sin(logits))  # not symmetric in the layers' contributions

  got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(shared_model, p)))(params)
  want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(lm(False), p)))(separate)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  contributions = [np.asarray(want_grads[layer]["ffn"]["values"]) for layer in LAYERS]
  assert all(np.abs(c).max() > 0 for c in contributions)
  np.testing.assert_allclose(got_grads["shared_memory_values"], sum(contributions),
                             rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(got_grads["layer_0"]["ffn"]["query"],
                             want_grads["layer_0"]["ffn"]["query"], rtol=1e-5, atol=1e-8)
  # The value learning rate applies to the shared table.
  assert optim.value_lr_labels(params)["shared_memory_values"] == optim.VALUE_LABEL


def test_sharing_needs_a_memory_ffn():
  with pytest.raises(ValueError, match="shared_memory_values=True needs a memory FFN.*allowed: pkm"):
    lm(True, ffn="dense")


def test_wrong_shared_table_shape_is_an_error():
  layer = ProductKeyMemory(d_model=16, num_keys=6, k=3, num_heads=2, d_key=8)
  x = jnp.zeros((1, 2, 16))
  with pytest.raises(ValueError, match=r"values_ND must have shape \(num_keys\^2, d_model\) = "
                                       r"\(36, 16\), got \(35, 16\)"):
    layer.init(jax.random.key(0), x, values_ND=jnp.zeros((35, 16)))


def test_value_rows_not_divisible_by_the_model_axis_is_an_error():
  layer = ProductKeyMemory(d_model=16, num_keys=3, k=2, num_heads=1, d_key=8)
  x = jnp.zeros((1, 2, 16))
  with jax.set_mesh(make_mesh(data=2, model=4)), with_rules():
    with pytest.raises(ValueError, match=r"memory_size=9 \(num_keys=3 squared\) is not divisible "
                                         r"by the mesh's 'model' axis \(size 4\)"):
      jax.eval_shape(layer.init, jax.random.key(0), x)
    good = layer.clone(num_keys=4)  # 16 rows over 4 shards
    jax.eval_shape(good.init, jax.random.key(0), x)
