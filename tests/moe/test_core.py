"""The pure MoE path `core.moe_apply`: jit and vmap, plugged-in functions, bias state, and
Batch Priority Routing on a hand-worked case."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.moe import balance
from sparsejax.moe import core
from sparsejax.moe import plan as plan_lib
from tests.moe import reference

G, T, D, F, E = 3, 6, 4, 8, 4
WEIGHTS = core.LossWeights(load_balance=1e-2, router_z=1e-3)


def _params(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"router_DE": jax.random.normal(keys[0], (D, E)),
          "wi_EDF": jax.random.normal(keys[1], (E, D, F)) / np.sqrt(D),
          "wo_EFD": jax.random.normal(keys[2], (E, F, D)) / np.sqrt(F)}


def _apply(params, x_TD, capacity_factor):
  router_fn = functools.partial(core.route_logits, router="top_k", k=2)
  expert_fn = functools.partial(core.ffn_experts, kind="ffn", tile=4)
  y_TD, aux, _ = core.moe_apply(params, x_TD, router_fn=router_fn, expert_fn=expert_fn,
                                capacity_factor=capacity_factor, loss_weights=WEIGHTS)
  return y_TD, aux


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_vmap_over_routing_groups_equals_a_loop_of_calls(capacity_factor):
  params = _params()
  x_GTD = jax.random.normal(jax.random.PRNGKey(1), (G, T, D))
  apply = functools.partial(_apply, params, capacity_factor=capacity_factor)
  got = jax.jit(jax.vmap(apply))(x_GTD)
  apply_one = jax.jit(apply)  # one compile for the G calls
  for g in range(G):
    want = apply_one(x_GTD[g])
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda v: v[g], got)), jax.tree.leaves(want),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if capacity_factor is None:
    logits = np.asarray(x_GTD[0], np.float64) @ np.asarray(params["router_DE"], np.float64)
    experts, gates = reference.top_k(logits, 2)
    want = reference.moe_loop(x_GTD[0], params, experts, gates, np.ones(experts.shape, bool),
                              "ffn")
    np.testing.assert_allclose(got[0][0], want, rtol=1e-5, atol=1e-5)


def test_bias_is_state_passed_in_and_returned():
  params, x_TD = _params(), jax.random.normal(jax.random.PRNGKey(2), (T, D))
  bias_E = jnp.asarray([0.0, 0.5, 0.0, -0.5])
  router_fn = functools.partial(core.route_logits, router="top_k", k=1)
  expert_fn = functools.partial(core.ffn_experts, kind="ffn", tile=4)
  _, aux, new_bias_E = jax.jit(functools.partial(
      core.moe_apply, router_fn=router_fn, expert_fn=expert_fn, bias_update_rate=0.1))(
          params, x_TD, bias_E=bias_E)
  logits = np.asarray(x_TD, np.float64) @ np.asarray(params["router_DE"], np.float64)
  experts, _ = reference.top_k(logits, 1, bias=bias_E)
  counts_E = np.bincount(experts.ravel(), minlength=E)
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"], counts_E / T, rtol=1e-6)
  np.testing.assert_allclose(new_bias_E, balance.update_bias(bias_E, counts_E, 0.1))
  _, _, no_bias = core.moe_apply(params, x_TD, router_fn=router_fn, expert_fn=expert_fn)
  assert no_bias is None


def _hand_worked_routing(**router_kwargs):
  """4 tokens, 2 experts, k = 1. Logits (ln 3, 0), (ln 9, 0), (0, ln 3), (0, ln 9) give router
  probabilities 0.75, 0.9 for expert 0 (tokens 0, 1) and 0.75, 0.9 for expert 1 (tokens 2, 3).
  Each gate is 1 after renormalisation (or softmax over the one selected logit)."""
  ln3, ln9 = np.log(3.0), np.log(9.0)
  x_TD = jnp.asarray([[ln3, 0.0], [ln9, 0.0], [0.0, ln3], [0.0, ln9]], jnp.float32)
  return core.route_logits({"router_DE": jnp.eye(2)}, x_TD, router="top_k", k=1,
                           router_kwargs=router_kwargs)


@pytest.mark.parametrize("router_kwargs", [{"renormalize": True},
                                           {"order": "topk_then_softmax"}])
def test_score_priority_ranks_by_the_raw_top1_probability(router_kwargs):
  """Capacity ceil(4 * 1 * 0.5 / 2) = 1 slot per expert. Batch Priority Routing keeps the
  token of highest top-1 probability per expert, 1 and 3 (0.9 > 0.75); position keeps 0 and
  2. Gates alone (all 1) cannot tell them apart."""
  routed = _hand_worked_routing(**router_kwargs)
  np.testing.assert_allclose(routed.plan.gate_TK[:, 0], np.ones(4), rtol=1e-6)
  by_score = core.limit_capacity(routed, 0.5, priority="score")
  by_position = core.limit_capacity(routed, 0.5, priority="position")
  assert by_score.capacity == 1
  np.testing.assert_array_equal(by_score.keep_TK[:, 0], [False, True, False, True])
  np.testing.assert_array_equal(by_position.keep_TK[:, 0], [True, False, True, False])


def test_score_priority_needs_router_probabilities():
  plan = plan_lib.plan_from_choices(jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1)),
                                    jnp.ones((4, 1), bool), 2)
  with pytest.raises(ValueError, match="priority 'score' ranks tokens by router probabilities"):
    core.limit_capacity(core.Routing(plan, None, {}), 0.5, priority="score")
