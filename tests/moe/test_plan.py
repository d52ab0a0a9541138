"""Dispatch-plan invariants (property tests), capacity and slot priority against a naive loop."""
import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from tests.moe import reference


def _check_slots(plan, capacity):
  """Kept slots of each expert are exactly 0..n_e - 1 with n_e <= capacity."""
  expert, slot, keep = map(np.asarray, (plan.expert_TK, plan.slot_TK, plan.keep_TK))
  for e in range(plan.num_experts):
    slots = np.sort(slot[keep & (expert == e)])
    np.testing.assert_array_equal(slots, np.arange(slots.size))
    assert capacity is None or slots.size <= capacity


def _check_gates(plan):
  gate = np.asarray(plan.gate_TK)
  assert np.all(gate >= 0) and np.all(gate <= 1)
  assert np.all(gate.sum(axis=1) <= 1 + 1e-5)
  assert np.all(gate[~np.asarray(plan.keep_TK)] == 0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _route_and_limit(logits_TE, router, k, capacity, priority):
  routed, _ = routing.ROUTERS.get(router)(logits_TE, k=k)
  return routed, plan_lib.apply_capacity(routed, capacity, priority)


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    num_tokens=st.integers(1, 12), num_experts=st.integers(1, 6), k=st.integers(1, 3),
    capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    priority=st.sampled_from(["position", "score"]),
    router=st.sampled_from(["top_k", "threshold"]), seed=st.integers(0, 2**16))
def test_capacity_never_exceeded_and_gates_bounded(num_tokens, num_experts, k, capacity_factor,
                                                   priority, router, seed):
  k = min(k, num_experts)
  logits = 3 * np.random.default_rng(seed).normal(size=(num_tokens, num_experts))
  capacity = plan_lib.compute_capacity(num_tokens, k, num_experts, capacity_factor)
  routed, limited = _route_and_limit(jnp.asarray(logits, jnp.float32), router, k, capacity,
                                     priority)
  _check_slots(routed, None)
  _check_gates(routed)
  _check_slots(limited, capacity)
  _check_gates(limited)
  assert not np.any(np.asarray(limited.keep_TK) & ~np.asarray(routed.keep_TK))
  sizes = np.asarray(plan_lib.group_sizes(limited))
  np.testing.assert_array_equal(
      sizes, np.minimum(np.asarray(plan_lib.group_sizes(routed)), capacity))


@pytest.mark.parametrize("priority", ["position", "score"])
@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_dropped_pairs_follow_priority(priority, capacity):
  logits = np.random.default_rng(capacity).normal(size=(13, 5)).astype(np.float32) * 2
  routed, _ = routing.route_top_k(jnp.asarray(logits), k=2)
  limited = plan_lib.apply_capacity(routed, capacity, priority)
  experts, gates = reference.top_k(logits, 2)
  keep = reference.capacity_keep(experts, np.ones_like(experts, bool), gates, capacity, priority)
  np.testing.assert_array_equal(limited.keep_TK, keep)
  np.testing.assert_allclose(limited.gate_TK, np.where(keep, gates, 0), rtol=1e-5)
  assert 0 < keep.sum() < keep.size


def test_score_priority_differs_from_position_priority():
  logits = np.random.default_rng(0).normal(size=(13, 5)).astype(np.float32) * 2
  routed, _ = routing.route_top_k(jnp.asarray(logits), k=1)
  by_position = plan_lib.apply_capacity(routed, 1, "position")
  by_score = plan_lib.apply_capacity(routed, 1, "score")
  assert not np.array_equal(by_position.keep_TK, by_score.keep_TK)


def test_compute_capacity_rounds_up():
  assert plan_lib.compute_capacity(13, 2, 5, 1.0) == 6
  assert plan_lib.compute_capacity(13, 2, 5, 1.0, multiple=4) == 8
  assert plan_lib.compute_capacity(4, 1, 8, 0.1, multiple=1) == 1
  assert plan_lib.compute_capacity(1024, 2, 32, 1.25) == 80


@pytest.mark.parametrize("capacity_factor", [0.0, -0.5])
def test_compute_capacity_rejects_non_positive_factor(capacity_factor):
  with pytest.raises(ValueError, match=f"capacity_factor must be > 0, got {capacity_factor}"):
    plan_lib.compute_capacity(8, 1, 4, capacity_factor)


def test_apply_capacity_rejects_unknown_priority_and_capacity_plans():
  routed, _ = routing.route_top_k(jnp.zeros((4, 3)), k=1)
  with pytest.raises(ValueError, match="priority must be one of .*got 'random'"):
    plan_lib.apply_capacity(routed, 2, "random")
  with pytest.raises(ValueError, match="already has capacity 2"):
    plan_lib.apply_capacity(plan_lib.apply_capacity(routed, 2), 2)


def test_plan_is_a_pytree_through_jit():
  routed, _ = routing.route_top_k(jnp.zeros((4, 3)), k=2)
  leaves = jax.tree_util.tree_leaves(routed)
  assert len(leaves) == 4
  out = jax.jit(lambda p: p.replace(gate_TK=p.gate_TK * 2))(routed)
  assert out.num_experts == 3 and out.capacity is None
