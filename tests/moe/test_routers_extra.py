"""BASE, Avg-K, expert-prototyping and MoEC routers against NumPy, alone and in the MoE layer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import sparsejax.moe  # noqa: F401  (registers "moe")
from sparsejax.moe import balance
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from sparsejax.registry import FFNS
from sparsejax.registry import ROUTERS
from tests.moe import reference

T, E = 24, 6
B, L, D, F = 2, 6, 8, 16


def _logits(seed=0, num_tokens=T, num_experts=E):
  return np.random.default_rng(seed).normal(size=(num_tokens, num_experts)).astype(np.float32)


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))


def _layer(**kwargs):
  return FFNS.get("moe")(d_model=D, d_ff=F, name="ffn",
                         **{"num_experts": 4, "tile": 4, "expert": "ffn", **kwargs})


def _init(layer, seed):
  """Params without compiling the forward pass (only the initialisers run)."""
  return layer.lazy_init(jax.random.PRNGKey(seed), jax.ShapeDtypeStruct((B, L, D), jnp.float32))


def test_balanced_training_gives_each_expert_exactly_t_over_e_near_optimally():
  logits = _logits(1)
  plan, aux = ROUTERS.get("balanced")(jnp.asarray(logits), k=1)
  capacity = T // E
  assert plan.capacity == capacity and plan.k == 1 and bool(jnp.all(plan.keep_TK))
  np.testing.assert_array_equal(plan_lib.group_sizes(plan), np.full(E, capacity))
  expert_T = np.asarray(plan.expert_TK[:, 0])
  total = logits[np.arange(T), expert_T].sum()
  best = reference.balanced_optimum(logits, capacity)
  assert total >= best - 0.01 * abs(best)
  np.testing.assert_allclose(plan.gate_TK[:, 0], scipy.special.expit(logits[np.arange(T),
                                                                              expert_T]),
                             rtol=1e-6)
  for e in range(E):
    np.testing.assert_array_equal(np.sort(np.asarray(plan.slot_TK)[expert_T == e, 0]),
                                  np.arange(capacity))
  np.testing.assert_allclose(aux["top1_agreement"],
                             np.mean(expert_T == logits.argmax(axis=1)), rtol=1e-6)


def test_balanced_inference_is_greedy_argmax():
  logits = _logits(2)
  plan, aux = routing.route_balanced(jnp.asarray(logits), k=1, deterministic=True)
  assert plan.capacity is None
  np.testing.assert_array_equal(plan.expert_TK[:, 0], logits.argmax(axis=1))
  np.testing.assert_allclose(plan.gate_TK[:, 0], scipy.special.expit(logits.max(axis=1)),
                             rtol=1e-6)
  assert aux["top1_agreement"] == 1.0


def test_avg_k_scores_blocks_by_mean_key_and_takes_top_k_with_unit_gates():
  rng = np.random.default_rng(3)
  x, w = rng.normal(size=(T, D)).astype(np.float32), rng.normal(size=(E, D, F)).astype(np.float32)
  logits = routing.avg_k_logits(jnp.asarray(x), jnp.asarray(w))
  scores, experts = reference.avg_k(x, w, 2)
  np.testing.assert_allclose(logits, scores, rtol=1e-5, atol=1e-5)
  plan, aux = ROUTERS.get("avg_k")(logits, k=2)
  np.testing.assert_array_equal(plan.expert_TK, experts)
  np.testing.assert_array_equal(plan.gate_TK, np.ones((T, 2)))
  np.testing.assert_allclose(aux["probs_TE"], reference.softmax(scores), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prototype_takes_top_1_in_each_of_k_groups(k):
  logits = _logits(4)
  plan, aux = ROUTERS.get("prototype")(jnp.asarray(logits), k=k)
  experts, gates = reference.prototype(logits, k)
  np.testing.assert_array_equal(plan.expert_TK, experts)
  np.testing.assert_allclose(plan.gate_TK, gates, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(aux["probs_TE"], axis=1), np.ones(T), rtol=1e-6)


def test_cluster_variance_loss_matches_numpy():
  probs = reference.softmax(_logits(5))
  for cluster_size in (1, 2, 3, 6):
    np.testing.assert_allclose(balance.cluster_variance_loss(jnp.asarray(probs), cluster_size),
                               reference.cluster_variance(probs, cluster_size), rtol=1e-5)


def test_moec_without_dropout_is_top_k_plus_the_cluster_loss():
  logits = _logits(6)
  plan, aux = ROUTERS.get("moec")(jnp.asarray(logits), k=2, cluster_size=3, renormalize=True)
  experts, gates = reference.top_k(logits, 2, renormalize=True)
  np.testing.assert_array_equal(plan.expert_TK, experts)
  np.testing.assert_allclose(plan.gate_TK, gates, rtol=1e-5)
  np.testing.assert_allclose(aux["losses"]["cluster_variance"],
                             reference.cluster_variance(reference.softmax(logits), 3), rtol=1e-5)


def test_moec_dropout_starves_the_dropped_experts_and_is_off_when_deterministic():
  logits = jnp.asarray(_logits(7))
  route = jax.jit(lambda rng, deterministic: routing.route_moec(
      logits, k=2, cluster_size=3, expert_dropout=0.34, rng=rng, deterministic=deterministic),
                  static_argnums=1)
  for seed in range(3):
    keep_E = np.asarray(routing.cluster_dropout_keep(jax.random.PRNGKey(seed), E, 3, 0.34))
    np.testing.assert_array_equal(keep_E.reshape(2, 3).sum(axis=1), [2, 2])
    plan, aux = route(jax.random.PRNGKey(seed), False)
    load_E = np.asarray(plan_lib.group_sizes(plan))
    np.testing.assert_array_equal(load_E[~keep_E], [0, 0])
    np.testing.assert_array_equal(np.asarray(aux["probs_TE"])[:, ~keep_E], np.zeros((T, 2)))
    kept = np.where(keep_E, np.asarray(logits), -np.inf)
    np.testing.assert_array_equal(plan.expert_TK, reference.top_k(kept, 2)[0])
    plan, _ = route(jax.random.PRNGKey(seed), True)
    np.testing.assert_array_equal(plan.expert_TK, reference.top_k(np.asarray(logits), 2)[0])


def test_balanced_layer_balances_only_in_training():
  layer = _layer(k=1, router="balanced", load_balance_weight=0.0)
  variables = _init(layer, 0)
  apply = jax.jit(layer.apply, static_argnames="deterministic")
  _, aux = apply(variables, _x(1), deterministic=False)
  np.testing.assert_array_equal(aux["metrics"]["expert_load_E"], np.full(4, 0.25))
  assert aux["metrics"]["dropped_fraction"] == 0
  _, aux = apply(variables, _x(1), deterministic=True)
  w_DE = nn.unbox(variables["params"]["router_DE"])
  top1 = np.argmax(np.asarray(_x(1)).reshape(-1, D) @ np.asarray(w_DE), axis=1)
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"],
                             np.bincount(top1, minlength=4) / (B * L), rtol=1e-6)


def test_avg_k_layer_has_no_router_and_matches_a_naive_loop():
  layer = _layer(k=2, router="avg_k")
  variables = _init(layer, 1)
  assert set(variables["params"]) == {"wi_EDF", "wo_EFD"}
  y, _ = jax.jit(layer.apply)(variables, _x(2))
  weights = {name: nn.unbox(value) for name, value in variables["params"].items()}
  x_TD = _x(2).reshape(-1, D)
  _, experts = reference.avg_k(x_TD, weights["wi_EDF"], 2)
  want = reference.moe_loop(x_TD, weights, experts, np.ones(experts.shape),
                            np.ones(experts.shape, bool), "ffn")
  np.testing.assert_allclose(y.reshape(-1, D), want, rtol=1e-5, atol=1e-5)


def test_moec_layer_adds_weighted_cluster_loss_and_drops_experts_only_in_training():
  layer = _layer(k=1, router="moec", router_loss_weight=0.5,
                 router_kwargs={"cluster_size": 2, "expert_dropout": 0.5})
  variables = _init(layer, 2)
  apply = jax.jit(layer.apply, static_argnames="deterministic")
  _, aux = apply(variables, _x(3), deterministic=True)  # Needs no "dropout" rng.
  logits = np.asarray(_x(3)).reshape(-1, D) @ np.asarray(nn.unbox(variables["params"]["router_DE"]))
  np.testing.assert_allclose(aux["losses"]["cluster_variance"],
                             0.5 * reference.cluster_variance(reference.softmax(logits), 2),
                             rtol=1e-4)
  assert "cluster_variance" not in aux["metrics"]
  for seed in range(2):
    _, aux = apply(variables, _x(3), deterministic=False,
                   rngs={"dropout": jax.random.PRNGKey(seed)})
    load_E = np.asarray(aux["metrics"]["expert_load_E"]).reshape(2, 2)
    np.testing.assert_array_equal(np.sum(load_E == 0, axis=1), [1, 1])


@pytest.mark.parametrize("name,kwargs,message", [
    ("balanced", {"k": 2}, "k must be 1 for balanced assignment .*got 2"),
    ("balanced", {"k": 1, "temperature": -1.0}, "temperature must be > 0, got -1.0"),
    ("prototype", {"k": 4}, "k must divide num_experts=6 .*got 4"),
    ("prototype", {"k": 7}, "k must be in \\[1, num_experts=6\\], got 7"),
    ("avg_k", {"k": 0}, "k must be in \\[1, num_experts=6\\], got 0"),
    ("moec", {"k": 2, "cluster_size": 4}, "cluster_size must divide num_experts=6, got 4"),
    ("moec", {"k": 2, "cluster_size": 0}, "cluster_size must divide num_experts=6, got 0"),
    ("moec", {"k": 2, "cluster_size": 3, "expert_dropout": 1.0},
     "expert_dropout must be in \\[0, 1\\), got 1.0"),
    ("moec", {"k": 4, "cluster_size": 3, "expert_dropout": 0.7},
     "expert_dropout=0.7 drops 2 of every 3 experts, leaving 2; .* at least k=4 must survive"),
    ("moec", {"k": 2, "cluster_size": 3, "expert_dropout": 0.3}, "needs rng when not"),
])
def test_router_argument_errors(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    ROUTERS.get(name)(jnp.asarray(_logits()), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"router": "balanced", "k": 1, "num_experts": 5},
     "num_tokens must be a multiple of num_experts=5 .*got 12"),
    ({"router": "balanced", "k": 2}, "k must be 1 for balanced assignment"),
    ({"router": "prototype", "k": 3}, "k must divide num_experts=4"),
])
def test_layer_config_errors_at_trace_time(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(_layer(**kwargs).init, jax.random.PRNGKey(0), _x())
