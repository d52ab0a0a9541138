"""Omni-Router: one router weight, owned by the TransformerLM, shared by all its MoE layers."""
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "moe" and "hash_moe")
from sparsejax.models import build_lm
from sparsejax.moe import routing
from sparsejax.registry import FFNS, ROUTERS

V, D, E = 32, 16, 4
MOE = {"name": "moe", "num_experts": E, "k": 2, "capacity_factor": float(E)}  # drops nothing
TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, V)


def lm(shared_router, ffn=MOE, num_layers=3, ffn_layers=(0, 2)):
  """A TransformerLM whose blocks `ffn_layers` use `ffn`, the others a dense FFN."""
  config = dict(d_model=D, num_layers=num_layers, num_heads=4, d_ff=32, max_len=8, ffn=ffn,
                ffn_layers=ffn_layers, shared_router=shared_router)
  return build_lm(ml_collections.ConfigDict(config), vocab_size=V)


def random_params(model, seed=0):
  """The model's params, filled with N(0, 0.3^2) numbers (no init to compile)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_the_param_tree_holds_exactly_one_router_weight():
  boxed = jax.eval_shape(lm(True).init, jax.random.key(0), TOKENS)["params"]
  paths = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed))
  assert [path for path in paths if "router" in path[-1]] == [("shared_router",)]
  assert boxed["shared_router"].value.shape == (D, E)
  assert boxed["shared_router"].names == ("embed", None)
  assert [path[0] for path in paths if path[-1] == "wi_EDF"] == ["layer_0", "layer_2"]


@ROUTERS.register("test_top_k_reporting_choices")
def route_top_k_reporting_choices(logits_TE, *, k):
  """top_k whose aux (hence the layer's metrics) also reports each token's experts and gates."""
  plan, aux = routing.route_top_k(logits_TE, k=k)
  return plan, {**aux, "expert_TK": plan.expert_TK, "gate_TK": plan.gate_TK}


@pytest.mark.parametrize("shared_router", [True, False])
def test_moe_layers_given_the_same_input_route_identically(shared_router):
  ffn = {**MOE, "router": "test_top_k_reporting_choices"}
  params = random_params(lm(shared_router, ffn))
  layer = FFNS.get("moe")(d_model=D, d_ff=32, **{k: v for k, v in ffn.items() if k != "name"})
  x_BTD = jax.random.normal(jax.random.key(1), (2, 8, D))
  router = {"router_DE": params["shared_router"]} if shared_router else {}
  apply = jax.jit(layer.apply)
  metrics = [apply({"params": params[layer_name]["ffn"]}, x_BTD, **router)[1]["metrics"]
             for layer_name in ("layer_0", "layer_2")]
  same_routing = all(np.array_equal(metrics[0][name], metrics[1][name])
                     for name in ("expert_TK", "gate_TK"))
  assert same_routing == shared_router


def _loss(model, target_BTV):
  def loss(params):
    logits_BTV, aux = model.apply({"params": params}, TOKENS)
    return jnp.sum(logits_BTV * target_BTV) + sum(aux["losses"].values()), logits_BTV
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_shared_router_gradient_is_the_sum_of_the_per_layer_gradients():
  shared, unshared = (lm(shared_router, num_layers=2, ffn_layers=None)
                      for shared_router in (True, False))
  shared_params = random_params(shared)
  router_DE = shared_params["shared_router"]
  unshared_params = {name: value for name, value in shared_params.items()
                     if name != "shared_router"}
  for layer in ("layer_0", "layer_1"):
    unshared_params[layer] = {**unshared_params[layer],
                              "ffn": {**unshared_params[layer]["ffn"], "router_DE": router_DE}}
  target_BTV = jax.random.normal(jax.random.key(2), (*TOKENS.shape, V))
  (loss, logits), grads = _loss(shared, target_BTV)(shared_params)
  (unshared_loss, unshared_logits), unshared_grads = _loss(unshared, target_BTV)(unshared_params)
  np.testing.assert_allclose(logits, unshared_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, unshared_loss, rtol=1e-5)
  per_layer = [unshared_grads[layer]["ffn"]["router_DE"] for layer in ("layer_0", "layer_1")]
  assert all(jnp.linalg.norm(g) > 0 for g in per_layer)
  np.testing.assert_allclose(grads["shared_router"], per_layer[0] + per_layer[1], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(grads["layer_1"]["ffn"]["wi_EDF"],
                             unshared_grads["layer_1"]["ffn"]["wi_EDF"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ffn", [{"name": "dense"}, {"name": "hash_moe", "num_experts": E}])
def test_shared_router_needs_an_ffn_that_shares_its_router(ffn):
  with pytest.raises(ValueError, match=f"ffn '{ffn['name']}' cannot; allowed: .*moe"):
    lm(True, ffn)


def test_router_weight_of_the_wrong_shape_is_a_clear_error():
  layer = FFNS.get("moe")(d_model=D, d_ff=32, num_experts=E)
  x_BTD = jnp.zeros((1, 2, D))
  with pytest.raises(ValueError, match=r"router_DE must have shape \(d_model, num_experts\)"):
    jax.eval_shape(layer.init, jax.random.key(0), x_BTD, router_DE=jnp.zeros((D, E + 1)))
