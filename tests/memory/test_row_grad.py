"""Row-form value gradients in the trainer's step: against dense jax.grad and the dense AdamW step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from experiments.bench import memory as bench_memory
from sparsejax.memory import ACCESS
from sparsejax.memory import ProductKeyMemory
from sparsejax.memory import row_grad
from sparsejax.memory import sparse_optim
from sparsejax.memory.layers import SHARED_VALUES

NUM_KEYS, TOKENS, K, DIM, QUERY = 64, 16, 4, 16, 8
N = NUM_KEYS**2
LR, WD = bench_memory.TRAIN_LEARNING_RATE, bench_memory.TRAIN_WEIGHT_DECAY


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@jax.jit
def _read_slots(params, inputs):
  """The slots the memory layer reads at `params`, from what it sows in ACCESS."""
  model = bench_memory.MemoryRegressor(d_model=DIM, num_keys=NUM_KEYS, k=K, d_key=QUERY)
  _, access = model.apply({"params": params}, inputs, mutable=[ACCESS])
  return access[ACCESS]["memory"]["idx"][0]


def _reads(params, inputs):
  """The set of slots the memory layer reads at `params`."""
  return set(np.asarray(_read_slots(params, inputs)).reshape(-1).tolist())


@pytest.fixture(scope="module")
def steps():
  """{"sparse" / "dense": (compiled trainer step, initial state, batch)}, same model and data."""
  out = {}
  for mode in ("sparse", "dense"):
    step, state, batch = bench_memory.train_setup(NUM_KEYS, TOKENS, K, mode, d_model=DIM,
                                                  d_key=QUERY)
    out[mode] = (step.lower(state, batch).compile(), state, batch, step)
  return out


def test_trainer_step_equals_dense_adamw_on_read_rows_and_keeps_others(steps):
  compiled, state, batch, _ = steps["sparse"]
  dense_compiled, dense_state, _, _ = steps["dense"]
  before = _host(state["params"])
  reads = [_reads(state["params"], batch["inputs"])]
  # Two steps on the same batch (the states are donated: copy what the checks need first).
  state, metrics = compiled(jax.tree.map(jnp.copy, state), batch)
  reads.append(_reads(state["params"], batch["inputs"]))
  state, _ = compiled(state, batch)
  dense_state, dense_metrics = dense_compiled(jax.tree.map(jnp.copy, dense_state), batch)
  dense_state, _ = dense_compiled(dense_state, batch)
  got, want = _host(state["params"]), _host(dense_state["params"])
  # The row-form gradient has the dense gradient's norm; the loss is the same.
  np.testing.assert_allclose(metrics["train/grad_norm"], dense_metrics["train/grad_norm"],
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["train/loss"], dense_metrics["train/loss"], rtol=1e-6)
  # Rows read at both steps: lazy row AdamW == dense AdamW (same moments, counts and decay).
  both = sorted(reads[0] & reads[1])
  assert 0 < len(both) < N
  np.testing.assert_allclose(got["memory"]["values"][both], want["memory"]["values"][both],
                             rtol=1e-5, atol=1e-6)
  # Rows never read: bit-identical (dense AdamW would decay them).
  never = sorted(set(range(N)) - reads[0] - reads[1])
  np.testing.assert_array_equal(got["memory"]["values"][never], before["memory"]["values"][never])
  assert np.all(want["memory"]["values"][never] != before["memory"]["values"][never])
  for name in ("query", "subkeys"):
    np.testing.assert_allclose(got["memory"][name], want["memory"][name], rtol=1e-5, atol=1e-7)


def _table_shaped_primitives(step, state, batch):
  """Names of the primitives in `step`'s jaxpr (nested ones too) that output an (N, D) array."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name not in ("jit", "pjit"):  # calls: their own equations are walked
        names.extend(eqn.primitive.name for v in eqn.outvars
                     if getattr(v.aval, "shape", None) == (N, DIM))
      for param in eqn.params.values():
        if isinstance(param, (core.Jaxpr, core.ClosedJaxpr)):
          walk(getattr(param, "jaxpr", param))

  walk(jax.make_jaxpr(step)(state, batch).jaxpr)
  return names


def test_trainer_step_forms_no_dense_value_gradient(steps):
  compiled, state, batch, step = steps["sparse"]
  # Only the three in-place row writes (Adam moments, table) make N x D arrays; a dense gradient
  # would add a zero N x D buffer (broadcast) and element-wise N x D optimizer math.
  assert sorted(_table_shaped_primitives(step, state, batch)) == [
      "scatter", "scatter", "scatter-add", "stop_gradient"]
  dense_names = _table_shaped_primitives(steps["dense"][3], *steps["dense"][1:3])
  assert "broadcast_in_dim" in dense_names
  table_bytes = N * DIM * 4
  assert compiled.memory_analysis().temp_size_in_bytes < table_bytes / 2
  assert steps["dense"][0].memory_analysis().temp_size_in_bytes >= table_bytes


class SharedTable(nn.Module):
  """Two memory layers, each with its own queries and keys, reading one shared value table."""

  @nn.compact
  def __call__(self, x_TD):
    shared_ND = ProductKeyMemory(d_model=8, num_keys=4, k=2, parent=None).values_param(
        self, SHARED_VALUES)
    for name in ("first", "second"):
      memory = ProductKeyMemory(d_model=8, num_keys=4, k=2, num_heads=2, d_key=4, name=name)
      x_TD = x_TD + memory(x_TD, values_ND=shared_ND)[0]
    return x_TD


def test_value_and_row_grad_matches_dense_grad_with_a_shared_table():
  model = SharedTable()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 8)), jnp.float32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])

  def loss(params, collections):
    y, new = model.apply({"params": params, **collections}, x, mutable=list(collections))
    return jnp.mean(y**2), (y, new)

  (value, (_, new)), grads = jax.jit(row_grad.value_and_row_grad(loss))(params, {})
  want_value, want = jax.jit(jax.value_and_grad(lambda p: loss(p, {})[0]))(params)
  assert new == {}
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  rows, dense = grads.pop(SHARED_VALUES), want.pop(SHARED_VALUES)
  idx, rows_RD = np.asarray(rows.idx_R), np.asarray(rows.rows_RD)
  real = idx < 16
  # Both layers' reads merged: unique rows, padding rows zero, scattered = the dense gradient.
  assert len(set(idx[real])) == real.sum() and np.all(rows_RD[~real] == 0)
  scattered = np.zeros((16, 8), np.float32)
  scattered[idx[real]] = rows_RD[real]
  np.testing.assert_allclose(scattered, dense, rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads, want)


def test_rows_norm_clip_and_apply_equal_their_dense_forms():
  table = jnp.arange(12.0).reshape(4, 3)
  rows = sparse_optim.Rows(jnp.asarray([1, 3, 4], jnp.int32),
                           jnp.asarray([[3.0, 0, 0], [0, 4.0, 0], [0, 0, 0]]))
  dense = np.zeros((4, 3), np.float32)
  dense[1, 0], dense[3, 1] = 3.0, 4.0

  @jax.jit
  def run(table, rows, w):
    tree = {"t": rows, "w": w}
    clipped, _ = sparse_optim.clip_by_global_norm(6.5).update(tree, None)
    return (sparse_optim.tree_norm(tree), clipped,
            sparse_optim.apply_updates({"t": table}, {"t": rows})["t"])

  norm, clipped, applied = run(table, rows, jnp.asarray([12.0]))
  assert norm == pytest.approx(13.0)  # sqrt(3^2 + 4^2 + 12^2)
  np.testing.assert_allclose(clipped["t"].rows_RD, [[1.5, 0, 0], [0, 2.0, 0], [0, 0, 0]])
  np.testing.assert_allclose(clipped["w"], [6.0])
  np.testing.assert_array_equal(applied, table + dense)
