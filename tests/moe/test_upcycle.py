"""Sparse upcycling: the upcycled MoE LM computes the dense LM's function; mismatches are errors."""
import functools

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "moe" and "hash_moe")
from sparsejax.models import TransformerLM
from sparsejax.moe import upcycle_params

TINY = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=8)
TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY["vocab_size"])
RENORMALIZED_TOP2 = (("k", 2), ("num_experts", 4), ("router_kwargs", (("renormalize", True),)),
                     ("tile", 4))


def dense_lm(activation="gelu", **kwargs):
  return TransformerLM(**{**TINY, **kwargs}, ffn_kwargs=(("activation", activation),))


def moe_lm(expert="ffn", ffn="moe", ffn_kwargs=RENORMALIZED_TOP2, **kwargs):
  return TransformerLM(**{**TINY, **kwargs}, ffn=ffn,
                       ffn_kwargs=(("expert", expert), *ffn_kwargs))


def params_of(model, seed=None):
  """The model's param shapes, filled with N(0, 0.3^2) numbers when a seed is given."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"])
  if seed is None:
    return shapes
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


@functools.cache
def dense_params_and_logits(activation):
  dense = dense_lm(activation)
  params = params_of(dense, seed=1)
  return params, jax.jit(dense.apply)({"params": params}, TOKENS)[0]


@pytest.mark.parametrize("activation,moe_kwargs,router_scale", [
    ("gelu", {"ffn_layers": (1,), "shared_router": True}, None),
    ("swiglu", {"expert": "swiglu"}, 0.1),
    ("swiglu", {"expert": "swiglu", "ffn": "hash_moe", "ffn_kwargs": (("num_experts", 4),)}, 0.0),
], ids=["gelu_one_layer_shared_router_kept", "swiglu_normal_router", "hash"])
def test_upcycled_lm_computes_the_dense_lm(activation, moe_kwargs, router_scale):
  moe = moe_lm(**moe_kwargs)
  dense_params, dense_logits = dense_params_and_logits(activation)
  template = params_of(moe, seed=2)
  params = upcycle_params(dense_params, template, router_scale=router_scale,
                          rng=jax.random.key(3))
  moe_logits, aux = jax.jit(moe.apply)({"params": params}, TOKENS)
  np.testing.assert_allclose(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)
  assert any(key.endswith("expert_load_E") for key in aux["metrics"])
  dense_flat = flax.traverse_util.flatten_dict(dense_params)
  for path, value in flax.traverse_util.flatten_dict(params).items():
    if path[-1] in ("router_DE", "shared_router") and router_scale is None:
      np.testing.assert_array_equal(value, flax.traverse_util.flatten_dict(template)[path])
    elif path[-1] in ("router_DE", "shared_router"):
      assert value.shape[-1] == 4 and jnp.std(value) <= 2 * router_scale
      assert jnp.all(value == 0) == (router_scale == 0)
    elif path[-1].endswith(("EDF", "EFD")):
      source = {"wi_EDF": "wi", "wg_EDF": "wi_gate", "wo_EFD": "wo"}[path[-1]]
      for expert in value:
        np.testing.assert_array_equal(expert, dense_flat[(*path[:-1], source)])
    else:
      np.testing.assert_array_equal(value, dense_flat[path])


def test_moe_blocks_left_out_of_layers_keep_the_template_params():
  template, dense_params = params_of(moe_lm(), seed=2), params_of(dense_lm(), seed=1)
  params = upcycle_params(dense_params, template, layers=[1], router_scale=0.0)
  kept, upcycled = template["layer_0"]["ffn"], params["layer_1"]["ffn"]
  jax.tree.map(np.testing.assert_array_equal, params["layer_0"]["ffn"], kept)
  assert jnp.all(upcycled["router_DE"] == 0)
  np.testing.assert_array_equal(upcycled["wi_EDF"][3], dense_params["layer_1"]["ffn"]["wi"])


@pytest.mark.parametrize("dense,moe,kwargs,message", [
    (dense_lm("swiglu"), moe_lm("ffn"), {}, "upcycling needs model.ffn.expert='swiglu'"),
    (dense_lm("gelu"), moe_lm("swiglu"), {}, "upcycling needs model.ffn.expert='ffn'"),
    (dense_lm(), moe_lm(d_ff=16), {}, r"cannot take dense layer_0/ffn/wi of shape \(16, 32\)"),
    (dense_lm(tie_embeddings=False), moe_lm(), {},
     r"dense params \['lm_head'\] have no counterpart"),
    (dense_lm(), moe_lm(ffn_kwargs=(("num_shared_experts", 1),)), {},
     "cannot upcycle layer_0/ffn/shared_wi_EDF"),
    (dense_lm(), moe_lm(ffn_layers=(0,)), {"layers": [1]}, r"layers \[1\] have no MoE FFN"),
    (dense_lm(), dense_lm(), {}, "has no FFN with experts"),
    (dense_lm(), moe_lm(), {"router_scale": 0.1}, "pass rng"),
    (dense_lm(), moe_lm(), {"router_scale": None}, "layer_0/ffn/router_DE is kept as it is"),
], ids=["swiglu_vs_ffn", "gelu_vs_swiglu", "d_ff", "lm_head", "shared_experts", "layers", "dense",
        "rng", "abstract_router"])
def test_mismatches_are_clear_errors(dense, moe, kwargs, message):
  with pytest.raises(ValueError, match=message):
    upcycle_params(params_of(dense, seed=1), params_of(moe), **{"router_scale": 0.0, **kwargs})
