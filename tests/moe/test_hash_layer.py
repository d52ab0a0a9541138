"""The hash-routed MoE FFN: routing vs a naive loop, balanced load, LM gradients, config, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "hash_moe")
from experiments.configs import moe_lm_hash
from sparsejax.models import build_lm
from sparsejax.moe import routing
from sparsejax.registry import FFNS
from tests.moe import reference

B, L, D, F, E, V = 2, 6, 8, 16, 4, 20


def _make(**kwargs):
  return FFNS.get("hash_moe")(d_model=D, d_ff=F, **{"num_experts": E, "vocab_size": V, "tile": 4,
                                                     **kwargs})


def random_params(module, *args, seed=0):
  """The module's params, filled with N(0, 0.3^2) numbers (no init to compile)."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize("kwargs,kind", [
    ({"hash_table": "random", "seed": 3}, "ffn"),
    ({"hash_table": "balanced", "token_frequencies": tuple(1.0 / np.arange(1, V + 1))}, "swiglu"),
])
def test_each_token_runs_the_expert_of_its_table_entry(kwargs, kind):
  layer = _make(expert=kind, **kwargs)
  x_BTD = jax.random.normal(jax.random.key(0), (B, L, D))
  ids_BT = jax.random.randint(jax.random.key(1), (B, L), 0, V)
  params = random_params(layer, x_BTD, ids_BT)
  y_BTD, aux = jax.jit(layer.apply)({"params": params}, x_BTD, ids_BT)
  assert set(params) == {"wi_EDF", "wo_EFD"} | ({"wg_EDF"} if kind == "swiglu" else set())
  assert aux["losses"] == {}
  if kwargs["hash_table"] == "random":
    table_V = routing.make_hash_table(V, E, seed=3)
  else:
    table_V = routing.make_balanced_hash_table(np.asarray(kwargs["token_frequencies"]), E)
  np.testing.assert_array_equal(layer.table_V(), table_V)
  expert_TK = table_V[np.asarray(ids_BT).reshape(-1, 1)]
  ones_TK = np.ones(expert_TK.shape)
  expected = reference.moe_loop(x_BTD.reshape(-1, D), params, expert_TK, ones_TK,
                                ones_TK.astype(bool), kind)
  np.testing.assert_allclose(y_BTD.reshape(-1, D), expected, rtol=1e-5, atol=1e-5)
  counts_E = np.bincount(table_V[np.asarray(ids_BT).reshape(-1)], minlength=E)
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"], counts_E / (B * L), rtol=1e-6)
  assert aux["metrics"]["dropped_fraction"] == 0


def test_balanced_table_balances_the_layer_load_on_zipf_tokens():
  vocab, experts, tokens = 5000, 8, 1 << 13
  freqs_V = 1.0 / np.arange(1, vocab + 1)
  ids_1T = np.random.default_rng(0).choice(vocab, tokens, p=freqs_V / freqs_V.sum())[None]
  x_1TD = jnp.zeros((1, tokens, 2))
  layer = FFNS.get("hash_moe")(d_model=2, d_ff=2, num_experts=experts, vocab_size=vocab,
                               hash_table="balanced", token_frequencies=tuple(freqs_V))
  _, aux = jax.jit(layer.apply)({"params": random_params(layer, x_1TD, ids_1T)}, x_1TD, ids_1T)
  load_E = aux["metrics"]["expert_load_E"]
  np.testing.assert_allclose(load_E * tokens, np.bincount(layer.table_V()[ids_1T[0]]))
  assert aux["metrics"]["load_max_over_mean"] <= 1.1
  random_counts_E = np.bincount(routing.make_hash_table(vocab, experts)[ids_1T[0]])
  assert random_counts_E.max() / random_counts_E.mean() > 1.1


def test_lm_with_hash_moe_trains_its_experts():
  config = ml_collections.ConfigDict(dict(
      d_model=16, num_layers=2, num_heads=4, d_ff=32, max_len=8,
      ffn={"name": "hash_moe", "num_experts": E, "hash_table": "balanced",
           "token_frequencies": list(np.linspace(1.0, 2.0, V)), "tile": 4}))
  model = build_lm(config, vocab_size=V)
  tokens_BT = jax.random.randint(jax.random.key(0), (2, 8), 0, V)
  params = random_params(model, tokens_BT)

  def loss(params):
    logits, aux = model.apply({"params": params}, tokens_BT)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), aux

  grads, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert aux["losses"] == {}
  for layer in ("layer_0", "layer_1"):
    assert set(grads[layer]["ffn"]) == {"wi_EDF", "wg_EDF", "wo_EFD"}
    used_E = np.asarray(aux["metrics"][f"{layer}/ffn/expert_load_E"]) > 0
    grad_norm_E = jnp.sqrt(jnp.sum(grads[layer]["ffn"]["wo_EFD"] ** 2, axis=(1, 2)))
    np.testing.assert_array_equal(grad_norm_E > 0, used_E)
    assert used_E.sum() >= 2


def test_config_builds_once_the_trainer_substitutes_frequencies():
  config = moe_lm_hash.get_config()
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  with pytest.raises(ValueError, match="must be replaced by one weight per token id"):
    jax.eval_shape(build_lm(config.model, vocab_size=258).init, jax.random.key(0), tokens)
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  del model_config.ffn["token_frequencies"]
  model_config.ffn.token_frequencies = tuple(np.ones(258) / 258)
  params = jax.eval_shape(build_lm(model_config, vocab_size=258).init, jax.random.key(0),
                          tokens)["params"]
  assert set(params["layer_0"]["ffn"]) == {"wi_EDF", "wg_EDF", "wo_EFD"}


@pytest.mark.parametrize("kwargs,message", [
    ({"hash_table": "balanced"}, "needs token_frequencies"),
    ({"hash_table": "lsh"}, "hash_table must be one of"),
    ({"token_frequencies": (1.0, 2.0)}, "token_frequencies must be 20 .* got shape"),
    ({"vocab_size": 0}, "vocab_size must be a positive int"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
  x_BTD, ids_BT = jnp.zeros((B, L, D)), jnp.zeros((B, L), jnp.int32)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(_make(**kwargs).init, jax.random.key(0), x_BTD, ids_BT)


@pytest.mark.parametrize("kwargs", [
    {"k": 2}, {"router_kwargs": {"renormalize": True}}, {"z_loss_weight": 1e-3}])
def test_learned_router_settings_are_no_hash_moe_fields(kwargs):
  """A hash layer has no learned router: a config setting one is a clear error."""
  (name, _), = kwargs.items()
  config = ml_collections.ConfigDict(dict(
      d_model=16, num_layers=1, num_heads=4, d_ff=32, max_len=8,
      ffn={"name": "hash_moe", "num_experts": E, **kwargs}))
  with pytest.raises(ValueError, match=f"unknown ffn kwarg '{name}' for ffn 'hash_moe'"):
    build_lm(config, vocab_size=V)
  with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
    _make(**kwargs)


def test_lm_passes_its_vocab_size_and_rejects_one_in_the_config():
  config = ml_collections.ConfigDict(dict(
      d_model=16, num_layers=1, num_heads=4, d_ff=32, max_len=8,
      ffn={"name": "hash_moe", "vocab_size": V}))
  with pytest.raises(ValueError, match="'vocab_size' is set by the model"):
    build_lm(config, vocab_size=V)
