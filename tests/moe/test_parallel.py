"""Expert parallelism on 8 fake CPU devices: equal to the single-device layer, drops by the rule."""
import functools

import flax.linen as nn
import jax
from jax import export
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.moe import dispatch
from sparsejax.moe import experts as experts_lib
from sparsejax.moe import layers
from sparsejax.moe import parallel
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing

B, L, D, F, E = 4, 8, 16, 16, 8  # T = 32 tokens: 4 per device on the (1, 8) mesh
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]  # (data, expert)
TOL = dict(rtol=1e-5, atol=1e-5)


def _moe(**kwargs):
  base = dict(d_model=D, d_ff=F, num_experts=E, k=2, router_kwargs={"renormalize": True},
              tile=16)
  return layers.MoE(**{**base, **kwargs})


def _inputs(layer):
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  cot = jax.random.normal(jax.random.PRNGKey(2), (B, L, D))
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x)["params"])
  return params, x, cot


_JITTED = {}


def _value_and_grads(layer):
  """jit of (params, x, cot) -> ((y, aux), grads of sum(y cot) + aux losses w.r.t. params, x).

  Cached per layer, so a mesh seen before reuses its compiled program.
  """
  key = repr(layer)
  if key not in _JITTED:
    _JITTED[key] = _make_value_and_grads(layer)
  return _JITTED[key]


def _make_value_and_grads(layer):
  def loss(params, x, cot):
    y, aux = layer.apply({"params": params}, x)
    return jnp.sum(y * cot) + sum(aux["losses"].values()), (y, aux)

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  def outputs_and_grads(params, x, cot):
    (_, outputs), grads = grad_fn(params, x, cot)
    return outputs, grads

  return jax.jit(outputs_and_grads)


def _assert_trees_close(got, want, **tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, **(tol or TOL))


@functools.lru_cache(maxsize=None)
def _single_device():
  layer = _moe()
  params, x, cot = _inputs(layer)
  return params, x, cot, jax.device_get(_value_and_grads(layer)(params, x, cot))


@pytest.mark.parametrize("data,expert", MESHES)
def test_outputs_grads_and_aux_equal_the_single_device_layer(data, expert):
  params, x, cot, ((y_ref, aux_ref), grads_ref) = _single_device()
  with jax.set_mesh(sharding.make_mesh(data=data, expert=expert)):
    (y, aux), grads = _value_and_grads(_moe())(params, x, cot)
  np.testing.assert_allclose(y, y_ref, **TOL)
  _assert_trees_close(grads, grads_ref)
  assert set(aux["metrics"]) == set(aux_ref["metrics"])
  _assert_trees_close(aux, aux_ref, rtol=1e-6, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _single_device_with_drops():
  params, x, _, _ = _single_device()
  return jax.device_get(jax.jit(_moe(capacity_factor=0.5).apply)({"params": params}, x))


@pytest.mark.parametrize("data,expert", MESHES)
def test_capacity_drops_the_same_tokens(data, expert):
  params, x, _, _ = _single_device()
  y_ref, aux_ref = _single_device_with_drops()
  with jax.set_mesh(sharding.make_mesh(data=data, expert=expert)):
    y, aux = jax.jit(_moe(capacity_factor=0.5).apply)({"params": params}, x)
  np.testing.assert_allclose(y, y_ref, **TOL)
  _assert_trees_close(aux, aux_ref, rtol=1e-6, atol=1e-6)
  assert aux["metrics"]["dropped_fraction"] > 0.2
  zero_rows = np.all(np.asarray(y) == 0, axis=-1)  # tokens whose every pair was dropped
  assert zero_rows.any()
  np.testing.assert_array_equal(zero_rows, np.all(np.asarray(y_ref) == 0, axis=-1))


ROUTER_CASES = {
    "expert_choice": dict(router="expert_choice", router_kwargs={"capacity_factor": 1.0}),
    "balanced": dict(router="balanced", k=1, router_kwargs={}, load_balance_weight=0.0),
    "threshold": dict(router="threshold", router_kwargs={"p": 0.5}, priority="score",
                      capacity_factor=1.0),
    "moec": dict(router="moec", router_kwargs={"cluster_size": 4, "expert_dropout": 0.5}),
    "avg_k": dict(router="avg_k", router_kwargs={}),
    "top_k_bias": dict(bias_update_rate=0.01),
}


class _AllRouters(nn.Module):
  """One MoE layer per router case on the same input (one compile for all of them)."""

  @nn.compact
  def __call__(self, x):  # the reference grouped matmul: routing is what is tested here
    return {case: _moe(name=case, implementation="reference", **kwargs)(x, deterministic=False)
            for case, kwargs in ROUTER_CASES.items()}


def test_every_router_routes_globally_under_ep():
  """Training-mode forward on a (2, 4) mesh equals one device: the plan is the global one, so
  expert choice's per-expert top-C and balanced assignment see all tokens of every device."""
  model = _AllRouters()
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  apply = jax.jit(lambda v, x: model.apply(v, x, rngs=rngs, mutable=["moe_bias"]))
  want = apply(variables, x)
  with jax.set_mesh(sharding.make_mesh(data=2, expert=4)):
    got = apply(variables, x)
  assert set(want[0]) == set(ROUTER_CASES)
  assert np.abs(got[1]["moe_bias"]["top_k_bias"]["bias_E"]).max() > 0
  _assert_trees_close(got, want)


def _sent_by_rule(expert_TK, keep_TK, blocks, num_shards, buffer):
  """The documented drop rule, naively: per block of tokens and destination shard, the first
  `buffer` kept pairs in choice-major, then token order are sent."""
  num_tokens, k = expert_TK.shape
  per_shard = E // num_shards
  sent = np.zeros_like(keep_TK)
  size = num_tokens // blocks
  for start in range(0, num_tokens, size):
    for shard in range(num_shards):
      taken = 0
      for choice in range(k):
        for t in range(start, start + size):
          if keep_TK[t, choice] and expert_TK[t, choice] // per_shard == shard:
            sent[t, choice] = taken < buffer
            taken += 1
  return sent


def _weights(seed=4):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  shapes = {"wi_EDF": (E, D, F), "wg_EDF": (E, D, F), "wo_EFD": (E, F, D)}
  return {name: jax.random.normal(key, shape) / np.sqrt(shape[1])
          for key, (name, shape) in zip(keys, shapes.items())}


@jax.jit
def _single_device_experts(x_TD, plan, weights):
  y_RD = experts_lib.experts_grouped(dispatch.dispatch(x_TD, plan), weights,
                                     plan_lib.group_sizes(plan), "swiglu")
  return dispatch.combine(y_RD, plan)


def test_factor_buffer_drops_deterministically_by_the_documented_rule():
  num_tokens, (data, expert), factor, num_chunks = 128, (2, 4), 0.5, 2
  x_TD = jax.random.normal(jax.random.PRNGKey(0), (num_tokens, D))
  logits_TE = 2 * jax.random.normal(jax.random.PRNGKey(1), (num_tokens, E))
  plan, _ = jax.jit(functools.partial(routing.route_top_k, k=2))(logits_TE)
  weights = _weights()
  chunk = num_tokens // (data * expert * num_chunks)
  buffer = parallel.exchange_buffer_size(chunk, 2, 2, E, expert, buffer_factor=factor)
  assert buffer == 2  # ceil(0.5 * 8 * 2 / 4); the worst case would be 8 * min(2, 2) = 16
  fn = jax.jit(functools.partial(parallel.expert_parallel_experts, kind="swiglu",
                                 pairs_per_token=2, buffer_factor=factor, num_chunks=num_chunks))
  with jax.set_mesh(sharding.make_mesh(data=data, expert=expert)):
    y_TD, dropped = fn(x_TD, plan, weights)
  sent = _sent_by_rule(np.asarray(plan.expert_TK), np.asarray(plan.keep_TK),
                       data * expert * num_chunks, expert, buffer)
  assert int(dropped) == np.sum(~sent) > 0
  kept = plan_lib.plan_from_choices(plan.expert_TK, plan.gate_TK, jnp.asarray(sent), E)
  np.testing.assert_allclose(y_TD, _single_device_experts(x_TD, kept, weights), **TOL)


def test_layer_reports_exchange_drops_in_dropped_fraction():
  layer = _moe(ep_buffer_factor=0.5)
  params, x, _, _ = _single_device()
  with jax.set_mesh(sharding.make_mesh(data=2, expert=4)):
    _, aux = jax.jit(layer.apply)({"params": params}, x)
  metrics = aux["metrics"]
  assert 0 < metrics["exchange_dropped_fraction"] == metrics["dropped_fraction"] < 1


def test_chunked_overlap_is_identical():
  params, x, cot, _ = _single_device()
  mesh = sharding.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh):
    one = _value_and_grads(_moe())(params, x, cot)
    two = _value_and_grads(_moe(ep_num_chunks=2))(params, x, cot)
  _assert_trees_close(two, one, rtol=0, atol=1e-6)


def test_fsdp_and_model_sharded_expert_weights():
  """Expert weights FSDP-sharded along embed (all-gathered on use) and model-sharded along mlp
  (outputs psum-ed over model) give the single-device outputs and gradients."""
  params, x, cot, ((y_ref, _), grads_ref) = _single_device()
  layer = _moe()
  mesh = sharding.make_mesh(fsdp=2, expert=2, model=2)
  boxed = jax.eval_shape(layer.init, jax.random.PRNGKey(1), x)["params"]
  param_shardings = sharding.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh)
  assert param_shardings["wi_EDF"].spec == P("expert", "fsdp", "model")
  with jax.set_mesh(mesh):
    placed = jax.device_put(params, param_shardings)
    (y, _), grads = _value_and_grads(layer)(placed, x, cot)
  np.testing.assert_allclose(y, y_ref, **TOL)
  _assert_trees_close(grads, grads_ref)


def test_auto_takes_the_shard_map_path_when_the_mesh_splits_tokens():
  params, x, _, _ = _single_device()

  def uses_shard_map(**kwargs):
    apply = lambda p: _moe(**kwargs).apply({"params": p}, x)
    return "shard_map" in str(jax.make_jaxpr(apply)(params))

  assert not uses_shard_map()  # no mesh
  for sizes, expected in [({"model": 8}, False), ({"data": 8}, True),
                          ({"fsdp": 2, "model": 4}, True), ({"data": 4, "expert": 2}, True)]:
    with jax.set_mesh(sharding.make_mesh(**sizes)):
      assert uses_shard_map() is expected, sizes
      assert not uses_shard_map(expert_parallel=False)


@pytest.mark.parametrize("tokens,k,capacity,factor,expected", [
    (32, 2, None, None, 32 * 2),       # worst case T_c min(K, E_l), E_l = 2
    (32, 1, None, None, 32),
    (32, 8, 5, None, 2 * 5),           # expert choice: capped at E_l C
    (32, 2, None, 1.0, 16),            # ceil(1.0 * 32 * 2 / 4)
    (32, 2, None, 1.25, 20),
    (3, 2, None, 0.1, 1),              # at least one row
    (32, 2, None, 100.0, 64),          # never above the worst case
])
def test_exchange_buffer_size(tokens, k, capacity, factor, expected):
  assert parallel.exchange_buffer_size(tokens, k, 2, E, 4, capacity=capacity,
                                       buffer_factor=factor) == expected


def test_all_to_all_bytes_counts_the_blocks_leaving_the_device():
  assert parallel.all_to_all_bytes(buffer=10, d_model=16, num_shards=4, itemsize=4) == 3 * 640
  assert parallel.all_to_all_bytes(buffer=10, d_model=16, num_shards=1, itemsize=4) == 0


def test_ragged_exchange_lowers_for_tpu_and_gpu():
  """XLA:CPU lacks ragged all-to-all, so only its lowering (forward and gradient) is checked."""
  tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")
  mesh = jax.sharding.AbstractMesh((2, 1, 4, 1), sharding.MESH_AXES, abstract_device=tpu)

  def loss(x_TD, logits_TE, weights):
    plan, _ = routing.route_top_k(logits_TE, k=2)
    y_TD, _ = parallel.expert_parallel_experts(x_TD, plan, weights, "swiglu", pairs_per_token=2,
                                               exchange="ragged", mesh=mesh)
    return jnp.sum(y_TD ** 2)

  args = (jax.ShapeDtypeStruct((64, D), jnp.float32), jax.ShapeDtypeStruct((64, E), jnp.float32),
          jax.eval_shape(_weights))
  checks = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
  for platform in ("tpu", "cuda"):
    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 2))), platforms=[platform],
                             disabled_checks=checks)(*args)
    assert "ragged_all_to_all" in exported.mlir_module()


def test_clear_errors():
  x = jnp.zeros((B, L, D))
  init = lambda layer: jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  with jax.set_mesh(sharding.make_mesh(data=2, expert=4)):
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the mesh's expert "
                                         r"axis \(mesh.expert=4\)"):
      init(_moe(num_experts=6))
    with pytest.raises(ValueError, match=r"exchange='ragged'.*platform 'cpu'"):
      init(_moe(ep_exchange="ragged"))
  with pytest.raises(ValueError, match="needs 6 devices but there are 8"):
    sharding.make_mesh(data=3, expert=2)
  with pytest.raises(ValueError, match="expert_parallel=True needs a device mesh"):
    init(_moe(expert_parallel=True))
  for field, value in [("expert_parallel", "yes"), ("ep_buffer_factor", 0.0),
                       ("ep_num_chunks", 0), ("ep_exchange", "nccl")]:
    with pytest.raises(ValueError, match=field):
      init(_moe(**{field: value}))
