"""PESC bottleneck-adapter experts: naive per-token loop, zero-init start, labels, errors."""
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "adapter_moe")
from sparsejax.models import DenseFFN
from sparsejax.moe import lora_experts
from sparsejax.registry import FFNS
from tests.moe import reference

B, L, D, F, E, R = 2, 3, 8, 12, 4, 3


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, D)), jnp.float32)


def _make(**kwargs):
  return FFNS.get("adapter_moe")(d_model=D, d_ff=F, name="ffn", **{
      "num_experts": E, "bottleneck": R, "tile": 4, "implementation": "reference", **kwargs})


def _random_params(layer, seed):
  """Every param (W^up included) ~ N(0, 0.5^2), unboxed."""
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), _x())["params"])
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(0.5 * rng.normal(size=shapes[name].shape), jnp.float32)
          for name in sorted(shapes)}


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _naive(x_TD, p, experts_TK, gates_TK, keep_TK, kind):
  """Per token: z = F(x), then z + sum over kept choices of g gelu(z Down_e) Up_e, float64."""
  p = {name: np.asarray(value, np.float64) for name, value in p.items()}
  y = np.zeros_like(x_TD, np.float64)
  for t in range(x_TD.shape[0]):
    h = x_TD[t] @ p["wi"]
    if kind == "swiglu":
      gate = x_TD[t] @ p["wi_gate"]
      h = gate / (1 + np.exp(-gate)) * h
    else:
      h = _gelu(h)
    z = h @ p["wo"]
    y[t] = z
    for k in range(experts_TK.shape[1]):
      if keep_TK[t, k]:
        e = experts_TK[t, k]
        y[t] += gates_TK[t, k] * _gelu(z @ p["adapter_down"][e]) @ p["adapter_up"][e]
  return y


@pytest.mark.parametrize("kind,k,router,implementation", [
    ("ffn", 2, "top_k", "reference"),
    ("swiglu", 1, "expert_choice", "reference"),
])
def test_matches_naive_per_token_loop(kind, k, router, implementation):
  router_kwargs = {"order": "softmax_then_topk", "renormalize": True} if router == "top_k" else {}
  layer = _make(expert=kind, k=k, router=router, router_kwargs=router_kwargs,
                implementation=implementation)
  params = _random_params(layer, seed=5)
  y, aux = jax.jit(layer.apply)({"params": params}, _x(6))
  x_TD = np.asarray(_x(6), np.float64).reshape(-1, D)
  logits = x_TD @ np.asarray(params["router_DE"], np.float64)
  if router == "top_k":
    experts, gates = reference.top_k(logits, k, renormalize=True)
    keep = np.ones(experts.shape, bool)
  else:
    keep, gates = reference.expert_choice(logits, int(np.ceil(B * L * k / E)))
    experts = np.broadcast_to(np.arange(E), keep.shape)
  expected = _naive(x_TD, params, experts, gates, keep, kind)
  np.testing.assert_allclose(y.reshape(-1, D), expected, rtol=1e-4, atol=1e-5)
  load = np.bincount(experts[keep], minlength=E) / keep.sum()
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"], load, rtol=1e-6)
  assert set(aux["losses"]) == {"load_balance", "router_z"}


def test_fresh_layer_computes_its_shared_ffn():
  (y, _), variables = jax.jit(_make().init_with_output)(jax.random.PRNGKey(4), _x(1))
  params = nn.unbox(variables["params"])
  assert not np.any(params["adapter_up"]) and np.any(params["adapter_down"])
  x_TD = np.asarray(_x(1), np.float64).reshape(-1, D)
  expected = _gelu(x_TD @ np.asarray(params["wi"], np.float64)) @ np.asarray(params["wo"],
                                                                              np.float64)
  np.testing.assert_allclose(y.reshape(-1, D), expected, rtol=1e-5, atol=1e-5)


def test_dense_ffn_loads_and_only_adapters_and_router_train():
  dense = DenseFFN(d_model=D, d_ff=F, activation="gelu", name="ffn")
  dense_params = _random_params(dense, seed=3)
  fresh = _random_params(_make(), seed=4)
  params = lora_experts.load_dense_ffn(dense_params, fresh)
  for name in params:
    source = dense_params if name in ("wi", "wo") else fresh
    np.testing.assert_array_equal(params[name], source[name], err_msg=name)
  labels = flax.traverse_util.flatten_dict(lora_experts.param_labels({"layer": params}), sep="/")
  assert sorted(path for path, label in labels.items() if label == "adapters") == [
      "layer/adapter_down", "layer/adapter_up", "layer/router_DE"]
  with pytest.raises(ValueError, match="no 'wi_gate'"):
    lora_experts.load_dense_ffn(dense_params, _random_params(_make(expert="swiglu"), seed=4))


def test_errors():
  for kwargs, match in [({"bottleneck": 0}, "bottleneck"), ({"router": "avg_k"}, "avg_k"),
                        ({"k": E + 1}, "k must"), ({"expert": "relu"}, "expert")]:
    with pytest.raises(ValueError, match=match):
      _make(**kwargs)
