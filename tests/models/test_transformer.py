"""Tests for the dense layers and the TransformerLM, against independent NumPy references."""
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.models import CausalSelfAttention, DenseFFN, TransformerLM, apply_rope, build_lm
from sparsejax.models.transformer import contract_fields
from sparsejax.registry import ATTENTIONS, FFNS, MODELS
from sparsejax.sharding import logical_to_mesh_sharding, make_mesh, with_rules

TINY = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=8)


@FFNS.register("test_toy_loss")
class ToyLossFFN(nn.Module):
  """Scales x by a learned vector and reports a constant loss and the mean |x|; has no d_ff."""

  d_model: int
  dtype: Any = jnp.float32
  loss_value: float = 1.0

  @nn.compact
  def __call__(self, x_BTD, *, deterministic=True):
    scale_D = self.param("scale", nn.initializers.ones, (self.d_model,))
    losses = {"toy": jnp.float32(self.loss_value)}
    return x_BTD * scale_D, {"losses": losses, "metrics": {"mean_abs": jnp.abs(x_BTD).mean()}}


@ATTENTIONS.register("test_toy_attention")
class ToyAttention(nn.Module):
  """Returns zeros and reports the sequence length as a metric; has no params."""

  d_model: int
  num_heads: int
  positions: str
  dtype: Any = jnp.float32

  def __call__(self, x_BTD, *, deterministic=True):
    return jnp.zeros_like(x_BTD), {"losses": {}, "metrics": {"tokens": jnp.float32(x_BTD.shape[1])}}


@FFNS.register("test_no_dtype")
class NoDtypeFFN(nn.Module):
  """Breaks the FFN contract: has no `dtype` field."""

  d_model: int
  d_ff: int


# --- NumPy references -----------------------------------------------------------------------------


def np_rope(x_BTHK, positions_T, max_wavelength=10_000.0):
  """RoPE as complex multiplication: (x_r + i x_{r+R}) * exp(i p theta_r)."""
  num_pairs = x_BTHK.shape[-1] // 2
  theta_R = max_wavelength ** (-2.0 * np.arange(num_pairs) / x_BTHK.shape[-1])
  z_BTHR = x_BTHK[..., :num_pairs] + 1j * x_BTHK[..., num_pairs:]
  z_BTHR = z_BTHR * np.exp(1j * np.asarray(positions_T)[None, :, None, None] * theta_R)
  return np.concatenate([z_BTHR.real, z_BTHR.imag], axis=-1)


def np_causal_attention(x_BTD, params, rope):
  """Multi-head causal attention with explicit loops over batch, heads and query positions."""
  x_BTD = np.asarray(x_BTD, np.float64)
  q_BTHK, k_BTHK, v_BTHK = (
      np.einsum("btd,dhk->bthk", x_BTD, params[name]) for name in ("wq", "wk", "wv")
  )
  if rope:
    positions_T = np.arange(x_BTD.shape[1])
    q_BTHK, k_BTHK = np_rope(q_BTHK, positions_T), np_rope(k_BTHK, positions_T)
  batch, length, heads, head_dim = q_BTHK.shape
  o_BTHK = np.zeros_like(q_BTHK)
  for b in range(batch):
    for h in range(heads):
      for i in range(length):
        scores = np.array([q_BTHK[b, i, h] @ k_BTHK[b, j, h] for j in range(i + 1)])
        weights = np.exp(scores / np.sqrt(head_dim) - np.max(scores / np.sqrt(head_dim)))
        weights /= weights.sum()
        o_BTHK[b, i, h] = sum(weights[j] * v_BTHK[b, j, h] for j in range(i + 1))
  return np.einsum("bthk,hkd->btd", o_BTHK, params["wo"])


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_ffn(x_BTD, params, activation):
  x_BTD = np.asarray(x_BTD, np.float64)
  h_BTF = x_BTD @ params["wi"]
  if activation == "gelu":
    h_BTF = np_gelu_tanh(h_BTF)
  else:
    gate_BTF = x_BTD @ params["wi_gate"]
    h_BTF = gate_BTF / (1.0 + np.exp(-gate_BTF)) * h_BTF
  return h_BTF @ params["wo"]


def as_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


def tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"])


# --- Layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_attention_matches_numpy_reference(positions):
  layer = CausalSelfAttention(d_model=16, num_heads=4, positions=positions)
  x_BTD = jax.random.normal(jax.random.key(1), (2, 6, 16))
  variables = layer.init(jax.random.key(2), x_BTD)
  y_BTD, aux = layer.apply(variables, x_BTD)
  expected = np_causal_attention(x_BTD, as_numpy(variables)["params"], rope=positions == "rope")
  np.testing.assert_allclose(y_BTD, expected, rtol=1e-5, atol=1e-5)
  assert aux == {"losses": {}, "metrics": {}}


def test_rope_rotates_a_2d_vector_by_position_radians():
  x_BTHK = jnp.array([[[[3.0, 4.0]], [[3.0, 4.0]]]])
  y_BTHK = apply_rope(x_BTHK, jnp.array([[0, 2]]))
  np.testing.assert_allclose(y_BTHK[0, 0, 0], [3.0, 4.0], atol=1e-6)
  np.testing.assert_allclose(
      y_BTHK[0, 1, 0],
      [3 * np.cos(2) - 4 * np.sin(2), 3 * np.sin(2) + 4 * np.cos(2)],
      atol=1e-6,
  )


def test_rope_pairs_the_two_halves_with_decreasing_frequencies():
  # K = 4: pairs (x0, x2) at theta 1 and (x1, x3) at theta 10000^(-1/2) = 0.01.
  y_BTHK = apply_rope(jnp.array([[[[1.0, 1.0, 0.0, 0.0]]]]), jnp.array([[1]]))
  np.testing.assert_allclose(
      y_BTHK[0, 0, 0], [np.cos(1), np.cos(0.01), np.sin(1), np.sin(0.01)], atol=1e-6
  )


def test_rope_attention_depends_only_on_relative_positions():
  q_BTHK, k_BTHK, v_BTHK = jax.random.normal(jax.random.key(3), (3, 2, 6, 2, 8))
  positions_1T = jnp.arange(6)[None, :]

  def attend(shift):
    q = apply_rope(q_BTHK, positions_1T + shift)
    k = apply_rope(k_BTHK, positions_1T + shift)
    return jax.nn.dot_product_attention(q, k, v_BTHK, is_causal=True)

  np.testing.assert_allclose(attend(0), attend(37), atol=1e-5)
  # The rotation itself does change with the shift, so the equality above is not vacuous.
  assert not np.allclose(apply_rope(q_BTHK, positions_1T), apply_rope(q_BTHK, positions_1T + 37))


def test_rope_rejects_an_odd_head_dim():
  with pytest.raises(ValueError, match="rope needs an even head dim, got 3"):
    apply_rope(jnp.ones((1, 2, 1, 3)), jnp.arange(2)[None])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dense_ffn_matches_numpy_reference(activation):
  layer = DenseFFN(d_model=8, d_ff=16, activation=activation)
  x_BTD = jax.random.normal(jax.random.key(4), (2, 3, 8))
  variables = layer.init(jax.random.key(5), x_BTD)
  y_BTD, aux = layer.apply(variables, x_BTD)
  np.testing.assert_allclose(
      y_BTD, np_ffn(x_BTD, as_numpy(variables)["params"], activation), rtol=1e-5, atol=1e-5
  )
  assert aux == {"losses": {}, "metrics": {}}


def test_dense_ffn_rejects_an_unknown_activation():
  with pytest.raises(ValueError, match="activation='relu'; allowed: gelu, swiglu"):
    DenseFFN(d_model=8, d_ff=16, activation="relu").init(jax.random.key(0), jnp.ones((1, 2, 8)))


# --- TransformerLM --------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_lm_logits_shape_and_causality(positions):
  model = TransformerLM(**TINY, positions=positions)
  tokens_BT = tokens(length=6)
  variables = model.init(jax.random.key(0), tokens_BT)
  apply = jax.jit(model.apply)
  logits_BTV, aux = apply(variables, tokens_BT)
  assert logits_BTV.shape == (2, 6, 32) and logits_BTV.dtype == jnp.float32
  assert aux == {"losses": {}, "metrics": {}}
  changed_BT = tokens_BT.at[:, 3].set((tokens_BT[:, 3] + 1) % 32)
  changed_logits_BTV, _ = apply(variables, changed_BT)
  np.testing.assert_allclose(changed_logits_BTV[:, :3], logits_BTV[:, :3], atol=1e-6)
  assert np.abs(changed_logits_BTV[:, 3:] - logits_BTV[:, 3:]).max(axis=-1).min() > 1e-4


def test_tied_and_untied_param_trees():
  tokens_BT = tokens()
  tied = nn.meta.unbox(TransformerLM(**TINY).init(jax.random.key(0), tokens_BT))["params"]
  untied = nn.meta.unbox(
      TransformerLM(**TINY, tie_embeddings=False, positions="learned").init(
          jax.random.key(0), tokens_BT
      )
  )["params"]
  block_keys = {"attention", "attention_norm", "ffn", "ffn_norm"}
  assert set(tied) == {"embed", "layer_0", "layer_1", "final_norm"}
  assert set(untied) == set(tied) | {"lm_head", "pos_embed"}
  assert set(tied["layer_1"]) == block_keys
  assert untied["lm_head"].shape == (16, 32)
  assert untied["pos_embed"].shape == (8, 16)
  assert tied["embed"]["embedding"].shape == (32, 16)
  # Plain nested dicts of arrays after unboxing.
  containers = jax.tree.leaves(tied, is_leaf=lambda node: not isinstance(node, dict))
  assert all(isinstance(leaf, jax.Array) for leaf in containers)


def largest_residual_outside_span(logits_BTV, embedding_VD):
  """Max |logits - projection of logits onto the span of the embedding's D columns|."""
  logits_VN = np.asarray(logits_BTV, np.float64).reshape(-1, logits_BTV.shape[-1]).T
  embedding_VD = np.asarray(embedding_VD, np.float64)
  coefficients_DN = np.linalg.lstsq(embedding_VD, logits_VN, rcond=None)[0]
  return np.abs(embedding_VD @ coefficients_DN - logits_VN).max()


def test_tied_logits_lie_in_the_span_of_the_embedding():
  tokens_BT = tokens()
  tied = TransformerLM(**TINY)
  tied_variables = nn.meta.unbox(tied.init(jax.random.key(0), tokens_BT))
  tied_logits_BTV, _ = tied.apply(tied_variables, tokens_BT)
  embedding_VD = tied_variables["params"]["embed"]["embedding"]
  assert largest_residual_outside_span(tied_logits_BTV, embedding_VD) < 1e-4
  # With V > D an untied head's logits leave that span, so the check above can fail.
  untied = TransformerLM(**TINY, tie_embeddings=False)
  untied_logits_BTV, _ = untied.apply(untied.init(jax.random.key(0), tokens_BT), tokens_BT)
  assert largest_residual_outside_span(untied_logits_BTV, embedding_VD) > 1e-2


def test_registered_ffn_on_selected_layers_merges_prefixed_aux():
  model = TransformerLM(
      **{**TINY, "num_layers": 3},
      ffn="test_toy_loss",
      ffn_kwargs=(("loss_value", 2.5),),
      ffn_layers=(1,),
  )
  variables = model.init(jax.random.key(0), tokens())
  _, aux = model.apply(variables, tokens())
  assert aux["losses"] == {"layer_1/ffn/toy": 2.5}
  assert set(aux["metrics"]) == {"layer_1/ffn/mean_abs"}
  params = nn.meta.unbox(variables)["params"]
  assert set(params["layer_0"]["ffn"]) == set(params["layer_2"]["ffn"]) == {"wi", "wo"}
  assert set(params["layer_1"]["ffn"]) == {"scale"}


def test_registered_layers_on_every_layer_when_ffn_layers_is_none():
  model = TransformerLM(**TINY, ffn="test_toy_loss", attention="test_toy_attention")
  _, aux = model.apply(model.init(jax.random.key(0), tokens()), tokens())
  assert aux["losses"] == {"layer_0/ffn/toy": 1.0, "layer_1/ffn/toy": 1.0}
  assert set(aux["metrics"]) == {
      "layer_0/attention/tokens",
      "layer_0/ffn/mean_abs",
      "layer_1/attention/tokens",
      "layer_1/ffn/mean_abs",
  }
  assert aux["metrics"]["layer_1/attention/tokens"] == 8


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = TransformerLM(**TINY, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), tokens())
  logits_BTV, _ = model.apply(variables, tokens())
  assert logits_BTV.dtype == jnp.float32
  param_dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(variables))}
  assert param_dtypes == {jnp.dtype("float32")}
  reference_BTV, _ = TransformerLM(**TINY).apply(variables, tokens())
  np.testing.assert_allclose(logits_BTV, reference_BTV, atol=0.1)


def test_sharded_forward_matches_single_device():
  model = TransformerLM(**TINY, tie_embeddings=False)
  tokens_BT = tokens(batch=8)
  variables = nn.meta.unbox(model.init(jax.random.key(0), tokens_BT))
  expected_BTV, _ = jax.jit(model.apply)(variables, tokens_BT)

  mesh = make_mesh(data=2, fsdp=2, model=2)
  with jax.set_mesh(mesh), with_rules():
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens_BT)
    shardings = logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh)
    sharded = jax.device_put(variables, shardings)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    logits_BTV, _ = jax.jit(model.apply)(sharded, jax.device_put(tokens_BT, batch_sharding))

  params = sharded["params"]
  assert params["embed"]["embedding"].sharding.spec == P("model", "fsdp")
  assert params["lm_head"].sharding.spec == P("fsdp", "model")
  assert params["layer_0"]["attention"]["wq"].sharding.spec == P("fsdp", "model", None)
  assert logits_BTV.sharding.spec == P(("data", "fsdp"), None, "model")
  np.testing.assert_allclose(logits_BTV, expected_BTV, atol=1e-5)


def constraint_specs(model, variables, tokens_BT):
  """The PartitionSpecs of the sharding constraints in the traced forward pass."""
  jaxpr = jax.make_jaxpr(model.apply)(variables, tokens_BT)
  return [
      eqn.params["sharding"].spec
      for eqn in jaxpr.eqns
      if eqn.primitive.name == "sharding_constraint"
  ]


def test_activation_constraints_resolve_only_under_the_rules():
  model = TransformerLM(**TINY)
  tokens_BT = tokens(batch=8)
  variables = nn.meta.unbox(model.init(jax.random.key(0), tokens_BT))
  mesh = make_mesh(data=2, fsdp=2, model=2)
  with jax.set_mesh(mesh):
    assert constraint_specs(model, variables, tokens_BT) == []
    with with_rules():
      specs = constraint_specs(model, variables, tokens_BT)
  batch = ("data", "fsdp", "expert")  # the expert axis splits tokens too (size 1 here)
  # After the embedding, after each of the 2 blocks, and on the logits.
  assert specs == [P(batch, None, None)] * 3 + [P(batch, None, "model")]


# --- build_lm -------------------------------------------------------------------------------------


def model_config(**overrides):
  """A valid tiny model config with `overrides` replacing (not merging into) its fields."""
  fields = dict(
      d_model=16,
      num_layers=2,
      num_heads=4,
      d_ff=32,
      max_len=8,
      positions="rope",
      tie_embeddings=True,
      ffn=dict(name="dense", activation="swiglu"),
      ffn_layers=None,
      attention=dict(name="dense"),
      dtype="float32",
  )
  return ml_collections.ConfigDict({**fields, **overrides})


def test_build_lm_maps_the_config():
  config = model_config(
      ffn=dict(name="test_toy_loss", loss_value=0.5), ffn_layers=[0], dtype="bfloat16"
  )
  model = build_lm(config, vocab_size=32)
  assert model == TransformerLM(
      **TINY,
      ffn="test_toy_loss",
      ffn_kwargs=(("loss_value", 0.5),),
      ffn_layers=(0,),
      dtype=jnp.bfloat16,
  )
  hash(model)
  _, aux = model.apply(model.init(jax.random.key(0), tokens()), tokens())
  assert aux["losses"] == {"layer_0/ffn/toy": 0.5}


def test_build_lm_defaults_the_optional_fields():
  config = ml_collections.ConfigDict(
      dict(d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=8)
  )
  assert build_lm(config, vocab_size=32) == TransformerLM(**TINY)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ffn": {"name": "nope"}}, "unknown ffn 'nope'; allowed: "),
        ({"attention": {"name": "nope"}}, "unknown attention 'nope'; allowed: "),
        ({"d_model": 18}, "d_model=18 must be divisible by num_heads=4"),
        ({"positions": "alibi"}, "positions='alibi'; allowed: rope, learned"),
        ({"ffn_layers": [0, 2]}, "ffn_layers [2] out of range; allowed: 0..1"),
        ({"ffn_layers": [-1]}, "ffn_layers [-1] out of range; allowed: 0..1"),
        (
            {"ffn": {"name": "dense", "num_experts": 4}},
            "unknown ffn kwarg 'num_experts' for ffn 'dense'; accepted: activation",
        ),
        (
            {"ffn": {"name": "test_toy_loss", "los_value": 4}},
            "unknown ffn kwarg 'los_value' for ffn 'test_toy_loss'; accepted: loss_value",
        ),
        ({"ffn": {"name": "dense", "d_ff": 64}}, "ffn kwarg 'd_ff' is set by the model"),
        (
            {"ffn": {"name": "test_toy_loss", "d_ff": 64}},
            "unknown ffn kwarg 'd_ff' for ffn 'test_toy_loss'; accepted: loss_value",
        ),
        (
            {"attention": {"name": "dense", "window": 4}},
            "unknown attention kwarg 'window' for attention 'dense'; accepted: rope_max_wavelength",
        ),
        ({"ffn": {"activation": "gelu"}}, "model.ffn needs a 'name' field"),
        ({"dtype": "float16"}, "model dtype='float16'; allowed: float32, bfloat16"),
        ({"num_experts": 4}, "unknown model config fields ['num_experts']"),
        ({"num_heads": 0}, "num_heads must be a positive int, got 0"),
        ({"d_model": 12, "num_heads": 4}, "positions='rope' needs an even head dim"),
    ],
)
def test_build_lm_errors(overrides, message):
  with pytest.raises(ValueError) as error:
    build_lm(model_config(**overrides), vocab_size=32)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_build_lm_requires_the_core_fields():
  config = model_config()
  del config["d_ff"]
  with pytest.raises(ValueError, match=r"model config lacks the required fields \['d_ff'\]"):
    build_lm(config, vocab_size=32)


def test_a_layer_missing_a_contract_field_is_reported():
  with pytest.raises(ValueError) as error:
    TransformerLM(**TINY, ffn="test_no_dtype")
  assert "ffn 'test_no_dtype' (NoDtypeFFN) lacks the contract fields ['dtype']" in str(error.value)


def test_contract_fields_keeps_only_the_fields_a_layer_declares():
  offered = dict(d_model=16, d_ff=32, dtype=jnp.bfloat16)
  assert contract_fields(DenseFFN, **offered) == offered
  assert contract_fields(ToyLossFFN, **offered) == dict(d_model=16, dtype=jnp.bfloat16)


def _models_and_memory_layers():
  registered = [
      (f"{registry.kind}:{name}", registry.get(name))
      for registry in (MODELS, FFNS, ATTENTIONS)
      for name in registry
  ]
  return [
      pytest.param(layer_cls, id=name)
      for name, layer_cls in registered
      if isinstance(layer_cls, type)
      and layer_cls.__module__.startswith(("sparsejax.models", "sparsejax.memory"))
  ]


@pytest.mark.parametrize("layer_cls", _models_and_memory_layers())
def test_deterministic_is_keyword_only(layer_cls):
  deterministic = inspect.signature(layer_cls.__call__).parameters["deterministic"]
  assert deterministic.kind is inspect.Parameter.KEYWORD_ONLY


def test_sequence_longer_than_max_len_is_rejected():
  model = TransformerLM(**TINY)
  with pytest.raises(ValueError, match="sequence length 9 exceeds max_len=8"):
    model.init(jax.random.key(0), tokens(length=9))
