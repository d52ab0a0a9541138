"""The MoE Linen layer: registry contract, shapes, aux, dense equivalence, balancing, batch
priority routing, errors."""
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "moe")
from sparsejax.registry import FFNS

B, L, D, F, E = 2, 5, 8, 16, 4


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))


def _make(**kwargs):
  return FFNS.get("moe")(d_model=D, d_ff=F, name="ffn", **{"num_experts": E, "tile": 4, **kwargs})


@pytest.mark.parametrize("router,router_kwargs,capacity_factor", [
    ("top_k", {}, None), ("expert_choice", {}, None), ("threshold", {"p": 0.5}, 0.25)])
def test_output_and_aux_shapes(router, router_kwargs, capacity_factor):
  layer = _make(router=router, router_kwargs=router_kwargs, capacity_factor=capacity_factor,
                num_shared_experts=1)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), _x())
  y, aux = jax.jit(layer.apply)(variables, _x())
  assert y.shape == (B, L, D) and y.dtype == jnp.float32
  assert set(aux) == {"losses", "metrics"}
  assert set(aux["losses"]) == {"load_balance", "router_z"}
  assert all(v.shape == () for v in aux["losses"].values())
  metrics = aux["metrics"]
  assert metrics["expert_load_E"].shape == (E,)
  np.testing.assert_allclose(jnp.sum(metrics["expert_load_E"]), 1.0, rtol=1e-6)
  for name in ("load_max_over_mean", "dropped_fraction", "router_entropy", "z_loss"):
    assert metrics[name].shape == ()
  if capacity_factor is None or router == "expert_choice":
    assert metrics["dropped_fraction"] == 0
  else:
    assert 0 < metrics["dropped_fraction"] < 1


def test_params_carry_logical_axes():
  variables = jax.eval_shape(_make(expert="swiglu").init, jax.random.PRNGKey(0), _x())
  names = {k: v.names for k, v in variables["params"].items()}
  assert names == {"router_DE": ("embed", None), "wi_EDF": ("expert", "embed", "mlp"),
                   "wg_EDF": ("expert", "embed", "mlp"), "wo_EFD": ("expert", "mlp", "embed")}


def _dense_ffn(x, params, kind):
  w = {name: nn.unbox(params[name])[0] for name in params if name.endswith(("EDF", "EFD"))}
  h = x @ w["wi_EDF"]
  h = jax.nn.silu(x @ w["wg_EDF"]) * h if kind == "swiglu" else jax.nn.gelu(h)
  return h @ w["wo_EFD"]


@pytest.mark.parametrize("kind,capacity_factor", [("ffn", None), ("swiglu", 4.0)])
def test_identical_experts_with_renormalized_gates_equal_the_dense_ffn(kind, capacity_factor):
  layer = _make(k=2, expert=kind, capacity_factor=capacity_factor,
                router_kwargs={"renormalize": True})
  variables = jax.jit(layer.init)(jax.random.PRNGKey(1), _x())
  params = dict(variables["params"])
  for name in ("wi_EDF", "wg_EDF", "wo_EFD"):
    if name in params:
      w = nn.unbox(params[name])
      params[name] = params[name].replace_boxed(jnp.broadcast_to(w[:1], w.shape))
  y, aux = jax.jit(layer.apply)({"params": params}, _x(2))
  assert aux["metrics"]["dropped_fraction"] == 0
  np.testing.assert_allclose(y, _dense_ffn(_x(2), params, kind), rtol=1e-5, atol=1e-5)


def test_dropless_equals_capacity_that_drops_nothing_including_gradients():
  x = _x(3)
  dropless = _make(expert="ffn", num_shared_experts=2)
  variables = jax.jit(dropless.init)(jax.random.PRNGKey(2), x)
  capped = _make(expert="ffn", num_shared_experts=2, capacity_factor=float(E))

  def loss(layer):
    return lambda v: jnp.sum(jnp.sin(layer.apply(v, x)[0]))

  got = jax.jit(jax.value_and_grad(loss(dropless)))(variables)
  want = jax.jit(jax.value_and_grad(loss(capped)))(variables)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jitter_only_when_not_deterministic_and_uses_dropout_rng():
  layer = _make(jitter=0.5)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), _x())
  apply = jax.jit(layer.apply, static_argnames="deterministic")
  train = lambda seed: apply(variables, _x(), deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(seed)})[0]
  assert not np.allclose(train(1), train(2))
  y_eval, _ = apply(variables, _x(), deterministic=True)  # Needs no "dropout" rng.
  assert not np.allclose(y_eval, train(1))


def test_aux_loss_free_bias_updates_only_when_training_and_mutable():
  layer = _make(bias_update_rate=0.1, load_balance_weight=0.0)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), _x())
  np.testing.assert_array_equal(variables["moe_bias"]["bias_E"], np.zeros(E))
  apply = jax.jit(layer.apply, static_argnames=("deterministic", "mutable"))
  (_, aux), state = apply(variables, _x(), deterministic=False, mutable="moe_bias")
  assert "load_balance" not in aux["losses"]
  load = np.asarray(aux["metrics"]["expert_load_E"])
  np.testing.assert_allclose(state["moe_bias"]["bias_E"], 0.1 * np.sign(load.mean() - load))
  _, state = apply(variables, _x(), deterministic=True, mutable="moe_bias")
  np.testing.assert_array_equal(state["moe_bias"]["bias_E"], np.zeros(E))


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 5}, "k must be in \\[1, num_experts=4\\], got 5"),
    ({"k": 0}, "k must be in \\[1, num_experts=4\\], got 0"),
    ({"capacity_factor": 0.0}, "capacity_factor must be None or > 0, got 0.0"),
    ({"capacity_factor": -1.0}, "capacity_factor must be None or > 0, got -1.0"),
    ({"router": "nope"}, "unknown router 'nope'; allowed:"),
    ({"router": "hash"}, "router 'hash' routes token ids"),
    ({"expert": "relu"}, "expert must be one of \\('ffn', 'swiglu'\\), got 'relu'"),
    ({"priority": "random"}, "priority must be one of"),
    ({"bias_update_rate": 0.1, "router": "threshold"}, "needs router 'top_k'"),
    ({"jitter": 1.0}, "jitter must be in \\[0, 1\\), got 1.0"),
])
def test_bad_config_raises_at_trace_time(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _make(**kwargs).init(jax.random.PRNGKey(0), _x())


def test_settings_are_checked_when_the_layer_is_built():
  with pytest.raises(ValueError, match="capacity_factor must be None or > 0, got 0.0"):
    _make(capacity_factor=0.0)


@pytest.mark.parametrize("router_kwargs", [{"renormalize": True},
                                           {"order": "topk_then_softmax"}])
def test_score_priority_keeps_the_tokens_of_highest_top1_probability(router_kwargs):
  """Hand-worked Batch Priority Routing: 4 tokens, 2 experts, k = 1, router W_r = I, so the
  logits are the inputs (ln 3, 0), (ln 9, 0), (0, ln 3), (0, ln 9): top-1 probabilities 0.75,
  0.9 on expert 0 and 0.75, 0.9 on expert 1, every gate 1. Capacity ceil(4 * 0.5 / 2) = 1:
  each expert keeps its token of probability 0.9, tokens 1 and 3; dropped tokens output 0."""
  ln3, ln9 = np.log(3.0), np.log(9.0)
  x = jnp.asarray([[[ln3, 0.0], [ln9, 0.0], [0.0, ln3], [0.0, ln9]]], jnp.float32)
  layer = FFNS.get("moe")(d_model=2, d_ff=4, num_experts=2, k=1, expert="ffn", tile=4,
                          capacity_factor=0.5, priority="score", router_kwargs=router_kwargs)
  params = dict(nn.unbox(jax.jit(layer.init)(jax.random.PRNGKey(0), x)["params"]))
  params["router_DE"] = jnp.eye(2)
  y, aux = jax.jit(layer.apply)({"params": params}, x)
  np.testing.assert_array_equal(np.any(np.asarray(y[0]) != 0, axis=-1), [False, True, False, True])
  np.testing.assert_allclose(aux["metrics"]["dropped_fraction"], 0.5)


@pytest.mark.parametrize("name", ["moe", "soft_moe", "hash_moe", "lora_moe", "conv_moe"])
def test_deterministic_is_keyword_only(name):
  deterministic = inspect.signature(FFNS.get(name).__call__).parameters["deterministic"]
  assert deterministic.kind is inspect.Parameter.KEYWORD_ONLY
