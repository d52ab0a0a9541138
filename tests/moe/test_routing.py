"""Routers against naive per-token references, router invariants and argument errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.moe import routing
from sparsejax.registry import ROUTERS
from tests.moe import reference

T, E = 13, 5


def _logits(seed=0, num_tokens=T, num_experts=E):
  return np.random.default_rng(seed).normal(size=(num_tokens, num_experts)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_matches_naive(k, order, renormalize):
  logits = _logits(k)
  plan, aux = ROUTERS.get("top_k")(jnp.asarray(logits), k=k, order=order,
                                   renormalize=renormalize)
  experts, gates = reference.top_k(logits, k, order, renormalize)
  np.testing.assert_array_equal(plan.expert_TK, experts)
  np.testing.assert_allclose(plan.gate_TK, gates, rtol=1e-5, atol=1e-6)
  assert bool(jnp.all(plan.keep_TK)) and plan.capacity is None
  np.testing.assert_allclose(aux["probs_TE"], reference.softmax(logits), rtol=1e-5)
  probs = reference.softmax(logits)
  np.testing.assert_allclose(aux["entropy"], np.mean(-np.sum(probs * np.log(probs), -1)),
                             rtol=1e-5)


def test_top_k_with_bias_selects_by_biased_logits_gates_from_unbiased():
  logits = _logits(3)
  bias = np.array([2.0, 0.0, -1.0, 0.5, 0.0], np.float32)
  plan, _ = routing.route_top_k(jnp.asarray(logits), k=2, bias_E=jnp.asarray(bias))
  experts, _ = reference.top_k(logits, 2, bias=bias)
  np.testing.assert_array_equal(plan.expert_TK, experts)
  probs = reference.softmax(logits)
  np.testing.assert_allclose(plan.gate_TK, np.take_along_axis(probs, experts, 1), rtol=1e-5)


def test_top_k_computes_in_float32_for_bfloat16_logits():
  logits = _logits(4)
  plan, aux = routing.route_top_k(jnp.asarray(logits, jnp.bfloat16), k=2)
  assert plan.gate_TK.dtype == jnp.float32 and aux["probs_TE"].dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  _, gates = reference.top_k(rounded, 2)
  np.testing.assert_allclose(plan.gate_TK, gates, rtol=1e-5)


def test_expert_choice_matches_naive_and_takes_exactly_capacity():
  logits = _logits(5)
  plan, aux = ROUTERS.get("expert_choice")(jnp.asarray(logits), k=2, capacity_factor=1.0)
  capacity = -(-T * 2 // E)
  assert plan.capacity == capacity
  keep, gates = reference.expert_choice(logits, capacity)
  np.testing.assert_array_equal(plan.keep_TK, keep)
  np.testing.assert_allclose(plan.gate_TK, gates, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.sum(plan.keep_TK, axis=0), np.full(E, capacity))
  np.testing.assert_array_equal(plan.expert_TK, np.broadcast_to(np.arange(E), (T, E)))
  for e in range(E):
    np.testing.assert_array_equal(np.sort(np.asarray(plan.slot_TK)[keep[:, e], e]),
                                  np.arange(capacity))
  np.testing.assert_allclose(aux["coverage"], np.mean(keep.any(axis=1)))
  np.testing.assert_allclose(aux["experts_per_token"], np.mean(keep.sum(axis=1)))


@pytest.mark.parametrize("p,k", [(0.25, 3), (0.6, 3), (0.9, 5), (1.0, 2)])
def test_threshold_matches_naive(p, k):
  logits = _logits(6)
  plan, aux = ROUTERS.get("threshold")(jnp.asarray(logits), k=k, p=p)
  experts, gates, valid = reference.threshold(logits, p, k)
  np.testing.assert_array_equal(plan.keep_TK, valid)
  np.testing.assert_array_equal(np.where(valid, plan.expert_TK, -1), np.where(valid, experts, -1))
  np.testing.assert_allclose(plan.gate_TK, gates, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux["experts_per_token"], valid.sum(1).mean(), rtol=1e-6)


def test_threshold_renormalized_gates_sum_to_one():
  plan, _ = routing.route_threshold(jnp.asarray(_logits(7)), k=3, p=0.5, renormalize=True)
  np.testing.assert_allclose(jnp.sum(plan.gate_TK, axis=1), np.ones(T), rtol=1e-6)


def test_hash_routes_by_table_lookup():
  table = routing.make_hash_table(50, E, seed=1)
  ids = np.random.default_rng(0).integers(0, 50, T)
  plan, aux = ROUTERS.get("hash")(jnp.asarray(ids), table_V=jnp.asarray(table), num_experts=E)
  np.testing.assert_array_equal(plan.expert_TK[:, 0], table[ids])
  np.testing.assert_array_equal(plan.gate_TK, np.ones((T, 1)))
  assert aux == {}


def test_hash_table_is_seeded_and_in_range():
  table = routing.make_hash_table(1000, 7, seed=3)
  np.testing.assert_array_equal(table, routing.make_hash_table(1000, 7, seed=3))
  assert table.min() == 0 and table.max() == 6
  assert not np.array_equal(table, routing.make_hash_table(1000, 7, seed=4))


def test_balanced_hash_table_greedy_on_hand_worked_case():
  # Largest first: 10 -> e0; 7 -> e1; 6 -> e1 (load 7 < 10); 3 -> e0 (load 10 < 13).
  table = routing.make_balanced_hash_table(np.array([3.0, 10.0, 6.0, 7.0]), 2)
  np.testing.assert_array_equal(table, [0, 0, 1, 1])


def test_balanced_hash_table_balances_zipf_vocabulary():
  vocab, num_experts = 5000, 8
  freqs = 1.0 / np.arange(1, vocab + 1)
  load = np.bincount(routing.make_balanced_hash_table(freqs, num_experts), weights=freqs,
                     minlength=num_experts)
  assert load.max() / load.mean() <= 1.1
  random_load = np.bincount(routing.make_hash_table(vocab, num_experts), weights=freqs,
                            minlength=num_experts)
  assert random_load.max() / random_load.mean() > load.max() / load.mean()


def test_jitter_is_bounded_multiplicative_noise():
  x = jnp.ones((4, 6))
  noisy = routing.apply_jitter(x, jax.random.PRNGKey(0), 0.1)
  assert bool(jnp.all((noisy >= 0.9) & (noisy <= 1.1))) and not bool(jnp.all(noisy == 1))
  np.testing.assert_array_equal(noisy, routing.apply_jitter(x, jax.random.PRNGKey(0), 0.1))


@pytest.mark.parametrize("name,kwargs,message", [
    ("top_k", {"k": 6}, "k must be in \\[1, num_experts=5\\], got 6"),
    ("top_k", {"k": 0}, "k must be in \\[1, num_experts=5\\], got 0"),
    ("top_k", {"k": 1, "order": "x"}, "order must be one of"),
    ("threshold", {"k": 2, "p": 0.0}, "p must be in \\(0, 1\\], got 0.0"),
    ("threshold", {"k": 2, "p": 1.5}, "p must be in \\(0, 1\\], got 1.5"),
    ("threshold", {"k": 9, "p": 0.5}, "k must be in"),
    ("expert_choice", {"k": 1, "capacity_factor": 0.0}, "capacity_factor must be > 0, got 0.0"),
    ("expert_choice", {"k": 1, "capacity_factor": -1.0}, "capacity_factor must be > 0"),
    ("expert_choice", {"k": 5, "capacity_factor": 2.0}, "capacity must be <= num_tokens"),
])
def test_router_argument_errors(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    ROUTERS.get(name)(jnp.asarray(_logits()), **kwargs)


def test_unknown_router_names_the_allowed_ones():
  with pytest.raises(ValueError, match="unknown router 'nope'; allowed: .*top_k"):
    ROUTERS.get("nope")
