"""FSSDP on 8 fake CPU devices: equal to a naive unsharded MoE, placements and bytes by hand."""
import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.moe import fssdp
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing

N, T, K, E, D, F = 8, 32, 2, 8, 16, 8  # 4 tokens per device; D / 8 = 2 rows of each shard
TOL = dict(rtol=2e-5, atol=2e-5)


@functools.cache
def _problem():
  rng = np.random.default_rng(0)  # NumPy draws: no small JAX programs to compile
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  x = normal(T, D)
  weights = {"wi_EDF": 0.3 * normal(E, D, F), "wo_EFD": 0.3 * normal(E, F, D)}
  logits = normal(T, E)
  logits[:, :3] += 3.0  # skewed: experts 0-2 dominate
  plan = jax.jit(lambda logits: routing.route_top_k(logits, k=K)[0])(logits)
  return x, weights, plan, normal(T, D)


def _naive_loss(x, weights, plan, cot):
  """sum(y * cot) with y_t = sum_k g_tk gelu(x_t Wi_e) Wo_e, each token's weights gathered."""
  y = 0.0
  for k in range(K):
    e = plan.expert_TK[:, k]
    h = jax.nn.gelu(jnp.einsum("td,tdf->tf", x, weights["wi_EDF"][e]))
    y = y + plan.gate_TK[:, k, None] * jnp.einsum("tf,tfd->td", h, weights["wo_EFD"][e])
  return jnp.sum(y * cot)


def test_paths_equal_naive_forward_and_grads():
  x, weights, plan, cot = _problem()
  want_loss, want_grads = jax.jit(jax.value_and_grad(_naive_loss, argnums=(0, 1)))(
      x, weights, plan, cot)
  max_experts = fssdp.required_experts(plan, N)
  assert max_experts < E  # the sparse path has something to save
  loads = plan_lib.group_sizes(plan)
  good = fssdp.load_placement(loads, N, 3)
  missing = np.where(good == 0, E, good)  # expert 0 (active) on no device: must fall back

  def loss_fn(x, weights, placement):
    with_ = dict(implementation="reference")  # cheapest grouped matmul to compile
    dense = fssdp.all_gather_experts(x, plan, weights, "ffn", **with_)
    local, local_over = fssdp.fssdp_experts(x, plan, weights, "ffn", max_experts=max_experts,
                                            **with_)
    load, load_over = fssdp.fssdp_experts(x, plan, weights, "ffn", placement_NM=placement,
                                          **with_)
    losses = jnp.stack([jnp.sum(y * cot) for y in (dense, local, load)])
    return jnp.sum(losses * jnp.array([1.0, 10.0, 100.0])), (losses, local_over, load_over)

  with jax.set_mesh(sharding.make_mesh(fsdp=N)):
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    for placement, overflow in ((good, False), (missing, True)):
      (_, (losses, local_over, load_over)), grads = step(x, weights, placement)
      assert not bool(local_over) and bool(load_over) == overflow
      np.testing.assert_allclose(losses, np.full(3, want_loss), **TOL)
      # the weighted sum 1, 10, 100 separates the three paths' gradients: 111 x the naive ones
      for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, 111.0 * want, rtol=1e-4, atol=1e-4)


def test_local_placement_hand_worked():
  # 2 devices x 2 tokens, K = 2, E = 4; device 0 uses {0, 3}, device 1 uses {1} (pair (3, 1)
  # is dropped, so expert 2 is not needed)
  plan = plan_lib.DispatchPlan(
      expert_TK=jnp.array([[3, 0], [0, 3], [1, 1], [1, 2]]), gate_TK=jnp.ones((4, 2)),
      slot_TK=jnp.zeros((4, 2), jnp.int32),
      keep_TK=jnp.array([[True, True], [True, True], [True, True], [True, False]]),
      num_experts=4)
  local_placement = jax.jit(fssdp.local_placement, static_argnums=(1, 2))
  placement, overflow = local_placement(plan, 2, 3)
  np.testing.assert_array_equal(placement, [[0, 3, 4], [1, 4, 4]])
  assert not bool(overflow)
  assert fssdp.required_experts(plan, 2) == 2
  placement, overflow = local_placement(plan, 2, 1)
  np.testing.assert_array_equal(placement, [[0], [1]])
  assert bool(overflow)


def test_load_placement_hand_worked():
  # n = 4, M = 2, loads 8, 4, 2, 2, 0, 0 (sum 16): replicas ceil(4 l / 16) = 2, 1, 1, 1, 0, 0.
  # Shares 4, 4 | 4 | 2 | 2 by LPT: e0 -> d0, e0 -> d1, e1 -> d2, e2 -> d3, e3 -> d3 (least
  # loaded with a free slot); every device ends with share 4.
  placement = fssdp.load_placement([8, 4, 2, 2, 0, 0], 4, 2)
  np.testing.assert_array_equal(placement, [[0, 6], [0, 6], [1, 6], [2, 3]])
  np.testing.assert_array_equal(fssdp.load_placement([8, 4, 2, 2, 0, 0], 4), placement)  # M=2
  with pytest.raises(ValueError, match="max_experts=1"):
    fssdp.load_placement([8, 4, 2, 2, 0, 0], 4, 1)  # 5 replicas > 4 slots
  with pytest.raises(ValueError, match="load_E"):
    fssdp.load_placement([1, -1], 4, 2)


def test_choose_replicas_round_robin():
  # expert 0 on devices 0 and 1 (slot 0 on both), expert 1 on device 1 (slot 1)
  placement = jnp.array([[0, 2], [0, 1]])
  plan = plan_lib.DispatchPlan(
      expert_TK=jnp.array([[0], [0], [0], [1]]), gate_TK=jnp.ones((4, 1)),
      slot_TK=jnp.array([[0], [1], [2], [0]]), keep_TK=jnp.ones((4, 1), bool), num_experts=2)
  dest, local, overflow = jax.jit(fssdp.choose_replicas)(plan, placement)
  np.testing.assert_array_equal(dest[:, 0], [0, 1, 0, 1])
  np.testing.assert_array_equal(local[:, 0], [0, 0, 0, 1])
  assert not bool(overflow)


def test_bytes_hand_worked():
  # one expert: wi 16 x 8 + wo 8 x 16 float32 = 1024 bytes. Dense over 8 devices: each sends
  # its 1/8 of 8 experts (1024 bytes) to 7 others, forward and backward: 2 * 7 * 1024 = 14336.
  _, weights, _, _ = _problem()
  size = fssdp.expert_bytes(weights)
  assert size == 1024
  assert fssdp.gather_bytes(E, size, N) == 14336
  assert fssdp.gather_bytes(3, size, N) == 5376
  # 4 tokens x 2 choices = 8 rows of 16 floats to each of 7 others, 4 times, + 8 int32 ids x 7
  assert fssdp.token_exchange_bytes(4, 2, 16, N, 4) == 4 * 7 * 8 * 64 + 7 * 8 * 4


def _collective_bytes(jaxpr, names):
  """Bytes a device sends in the traced program: (n - 1) / n of each collective's operand (or,
  for all_gather, its result)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in names:
      avals = eqn.outvars if eqn.primitive.name == "all_gather" else eqn.invars
      total += sum(v.aval.size * v.aval.dtype.itemsize for v in avals) * (N - 1) // N
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += _collective_bytes(sub, names)
  return total


def test_bytes_match_traced_collectives():
  x, weights, plan, cot = _problem()
  max_experts = fssdp.required_experts(plan, N)
  ref = dict(implementation="reference")
  dense = lambda x, w: jnp.sum(fssdp.all_gather_experts(x, plan, w, "ffn", **ref) * cot)
  sparse = lambda x, w: jnp.sum(fssdp.fssdp_experts(x, plan, w, "ffn", max_experts=max_experts,
                                                    **ref)[0] * cot)
  placement = fssdp.load_placement(plan_lib.group_sizes(plan), N, 3)
  load = lambda x, w: jnp.sum(fssdp.fssdp_experts(x, plan, w, "ffn", placement_NM=placement,
                                                  **ref)[0] * cot)
  with jax.set_mesh(sharding.make_mesh(fsdp=N)):
    dense_jaxpr, sparse_jaxpr, load_jaxpr = (
        jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, weights).jaxpr
        for f in (dense, sparse, load))
  size = fssdp.expert_bytes(weights)
  assert (_collective_bytes(dense_jaxpr, ("all_gather", "reduce_scatter"))
          == fssdp.gather_bytes(E, size, N))
  # the sparse branch's all_to_alls (its dense fallback branch has none)
  assert (_collective_bytes(sparse_jaxpr, ("all_to_all",))
          == fssdp.gather_bytes(max_experts, size, N))
  assert (_collective_bytes(load_jaxpr, ("all_to_all",))
          == fssdp.gather_bytes(3, size, N) + fssdp.token_exchange_bytes(T // N, K, D, N, 4))


def test_errors():
  x, weights, plan, _ = _problem()
  mesh = sharding.make_mesh(fsdp=N)
  with pytest.raises(ValueError, match="exactly one"):
    fssdp.fssdp_experts(x, plan, weights, "ffn", mesh=mesh)
  with pytest.raises(ValueError, match="max_experts must be"):
    fssdp.fssdp_experts(x, plan, weights, "ffn", max_experts=0, mesh=mesh)
  with pytest.raises(ValueError, match="axis='rows'"):
    fssdp.all_gather_experts(x, plan, weights, "ffn", mesh=mesh, axis="rows")
  with pytest.raises(ValueError, match="must divide"):
    fssdp.all_gather_experts(x[:30], plan.replace(expert_TK=plan.expert_TK[:30]), weights,
                             "ffn", mesh=mesh)
