"""Dispatch + experts + combine against a naive per-expert loop: outputs and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.moe import dispatch
from sparsejax.moe import experts as experts_lib
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from tests.moe import reference

T, D, F, E = 13, 6, 8, 5


def _inputs(kind, seed=0):
  rng = np.random.default_rng(seed)
  weights = {"wi_EDF": rng.normal(size=(E, D, F)), "wo_EFD": rng.normal(size=(E, F, D)) / 3}
  if kind == "swiglu":
    weights["wg_EDF"] = rng.normal(size=(E, D, F))
  weights = {name: jnp.asarray(w, jnp.float32) for name, w in weights.items()}
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(T, E)) * 2, jnp.float32)
  return x, weights, logits


def _library_moe(x, weights, logits, kind, router, capacity=None, priority="position"):
  """Route, optionally cap, dispatch, run the experts and combine with the library."""
  routed, _ = router(logits)
  plan = routed if capacity is None else plan_lib.apply_capacity(routed, capacity, priority)
  x_RD = dispatch.dispatch(x, plan)
  if plan.capacity is None:
    y_RD = experts_lib.experts_grouped(x_RD, weights, plan_lib.group_sizes(plan), kind, tile=4)
  else:
    x_ECD = x_RD.reshape(E, plan.capacity, D)
    y_RD = experts_lib.experts_batched(x_ECD, weights, kind).reshape(x_RD.shape)
  return dispatch.combine(y_RD, plan)


ROUTERS = {
    "top_k": lambda logits: routing.route_top_k(logits, k=2),
    "threshold": lambda logits: routing.route_threshold(logits, k=3, p=0.6),
    "expert_choice": lambda logits: routing.route_expert_choice(logits, k=2),
}


def _reference_choices(name, logits):
  """Naive routing: experts [T, K], keep [T, K] and a differentiable gates(logits) -> [T, K]."""
  logits = np.asarray(logits)
  if name == "top_k":
    experts, _ = reference.top_k(logits, 2)
    keep = np.ones_like(experts, bool)
  elif name == "threshold":
    experts, _, keep = reference.threshold(logits, 0.6, 3)
  else:
    keep, _ = reference.expert_choice(logits, -(-T * 2 // E))
    experts = np.broadcast_to(np.arange(E), (T, E))

  def gates(logits):
    return jnp.where(keep, jnp.take_along_axis(jax.nn.softmax(logits), experts, axis=1), 0.0)

  return experts, keep, gates


def _assert_same_values_and_grads(library_fn, reference_fn, args):
  cotangent = np.random.default_rng(7).normal(size=(T, D)).astype(np.float32)

  @jax.jit
  def outputs_and_grads(fn, *args):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(cotangent)

  got = outputs_and_grads(jax.tree_util.Partial(library_fn), *args)
  want = outputs_and_grads(jax.tree_util.Partial(reference_fn), *args)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router_name,kind,capacity", [
    ("top_k", "ffn", None),
    ("top_k", "swiglu", None),
    ("top_k", "swiglu", 3 * T),
    ("threshold", "ffn", None),
    ("threshold", "swiglu", 3 * T),
    ("expert_choice", "swiglu", None),
])
def test_matches_naive_loop_when_nothing_is_dropped(router_name, kind, capacity):
  """capacity None is dropless (grouped matmul); 3 T holds every pair (capacity buffers)."""
  x, weights, logits = _inputs(kind)
  experts, keep, gates = _reference_choices(router_name, logits)

  def library_fn(x, weights, logits):
    return _library_moe(x, weights, logits, kind, ROUTERS[router_name], capacity)

  def reference_fn(x, weights, logits):
    return reference.moe_loop(x, weights, experts, gates(logits), keep, kind)

  _assert_same_values_and_grads(library_fn, reference_fn, (x, weights, logits))


@pytest.mark.parametrize("priority,capacity", [("position", 1), ("score", 3)])
def test_small_capacity_drops_exactly_the_pairs_past_capacity(priority, capacity):
  x, weights, logits = _inputs("ffn", seed=1)
  experts, gate_values = reference.top_k(np.asarray(logits), 2)
  keep = reference.capacity_keep(experts, np.ones_like(experts, bool), gate_values, capacity,
                                 priority)
  assert 0 < keep.sum() < keep.size

  def library_fn(x, weights, logits):
    return _library_moe(x, weights, logits, "ffn", ROUTERS["top_k"], capacity, priority)

  def reference_fn(x, weights, logits):
    gates = jnp.take_along_axis(jax.nn.softmax(logits), experts, axis=1)
    return reference.moe_loop(x, weights, experts, gates, keep, "ffn")

  _assert_same_values_and_grads(library_fn, reference_fn, (x, weights, logits))


def test_rows_of_a_capacity_plan_hold_their_tokens_and_empty_rows_are_zero():
  x, _, logits = _inputs("ffn", seed=2)
  routed, _ = routing.route_top_k(logits, k=1)
  plan = plan_lib.apply_capacity(routed, 2)
  x_ECD = np.asarray(dispatch.dispatch(x, plan)).reshape(E, 2, D)
  expected = np.zeros((E, 2, D), np.float32)
  for t in range(T):
    if plan.keep_TK[t, 0]:
      expected[plan.expert_TK[t, 0], plan.slot_TK[t, 0]] = x[t]
  np.testing.assert_array_equal(x_ECD, expected)


def test_dropless_rows_are_sorted_by_expert():
  x, _, logits = _inputs("ffn", seed=3)
  plan, _ = routing.route_top_k(logits, k=2)
  rows = np.asarray(dispatch.dispatch(jnp.arange(T, dtype=jnp.float32)[:, None], plan))[:, 0]
  experts, _ = reference.top_k(np.asarray(logits), 2)
  expected = [t for e in range(E) for j in range(2) for t in range(T) if experts[t, j] == e]
  np.testing.assert_array_equal(rows, expected)
