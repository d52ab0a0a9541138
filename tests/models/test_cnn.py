"""SmallCNN: pluggable pointwise FFNs (dense, moe, conv_moe), forward/backward, aux, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.memory  # noqa: F401  (registers "pkm")
import sparsejax.moe  # noqa: F401  (registers "moe" and "conv_moe")
from sparsejax.models import SmallCNN

E = 4
# The grouped matmul's dense reference compiles fastest; its other backends are tested in
# tests/kernels and tests/moe.
MOE_KWARGS = (("expert", "ffn"), ("implementation", "reference"), ("num_experts", E),
              ("tile", 4))


def _images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)


def _cnn(**kwargs):
  return SmallCNN(**{"num_classes": 3, "channels": 4, "d_ff": 8, **kwargs})


def test_moe_and_conv_moe_blocks_train_and_report_expert_load():
  conv = _cnn(ffn="conv_moe", ffn_kwargs=MOE_KWARGS, ffn_blocks=(1,))
  shapes = nn.unbox(jax.eval_shape(conv.init, jax.random.PRNGKey(0), _images())["params"])
  assert set(shapes["block_0"]["ffn"]) == {"wi", "wo"}  # "dense" outside ffn_blocks
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32),
                        shapes)
  variables = {"params": params}

  def loss(p, model):
    logits, aux = model.apply({"params": p}, _images())
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0]) + sum(aux["losses"].values()), (logits, aux)

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (logits, aux)), grads = grad_fn(params, conv)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  load = aux["metrics"]["block_1/ffn/expert_load_E"]
  assert load.shape == (E,)
  np.testing.assert_allclose(np.sum(load), 1.0, rtol=1e-6)
  assert set(aux["losses"]) == {"block_1/ffn/load_balance", "block_1/ffn/router_z"}
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert np.any(grads["block_1"]["ffn"]["wi_EDF"]) and np.any(grads["block_1"]["ffn"]["router_DE"])

  tokens = _cnn(ffn="moe", ffn_kwargs=dict(MOE_KWARGS), ffn_blocks=(1,))
  tokens_logits, tokens_aux = jax.jit(tokens.apply)(variables, _images())
  np.testing.assert_allclose(tokens_logits, logits, rtol=1e-5, atol=1e-6)
  assert set(tokens_aux["metrics"]) == set(aux["metrics"])


def test_an_ffn_without_d_ff_gets_none():
  memory = _cnn(ffn="pkm", ffn_kwargs=(("num_keys", 4), ("k", 2), ("num_heads", 1),
                                       ("d_key", 4)), ffn_blocks=(0,))
  variables = memory.init(jax.random.PRNGKey(0), _images())
  logits, aux = memory.apply(variables, _images())
  assert logits.shape == (2, 3)
  assert "values" in variables["params"]["block_0"]["ffn"]
  assert 0 < aux["metrics"]["block_0/ffn/memory_usage"] <= 1


@pytest.mark.parametrize("kwargs,images_shape,match", [
    ({}, (2, 8, 8), "4-D"),
    ({"ffn": "hash_moe"}, (2, 8, 8, 1), "token id"),
    ({"ffn": "moe", "ffn_kwargs": (("experts", 4),)}, (2, 8, 8, 1), "unknown ffn kwarg"),
    ({"ffn_blocks": (2,)}, (2, 8, 8, 1), "ffn_blocks"),
    ({"num_classes": 0}, (2, 8, 8, 1), "num_classes"),
])
def test_errors(kwargs, images_shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_cnn(**kwargs).init, jax.random.PRNGKey(0), jnp.zeros(images_shape))
