"""Row-sparse value-table optimizers against optax.adamw and float64 NumPy lazy references."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import optim as run_optim
from sparsejax.memory import sparse_optim

N, D = 6, 3
# Touched rows per step; step 3 touches nothing, rows 1, 3 and 4 are never touched.
TOUCHED = ([0, 2], [2, 5], [], [0, 5], [2])


def _grads(seed, touched_sets):
  """A dense (N, D) gradient per step, non-zero exactly on that step's rows."""
  rng = np.random.default_rng(seed)
  grads = []
  for rows in touched_sets:
    g = np.zeros((N, D), np.float32)
    g[rows] = rng.normal(size=(len(rows), D))
    grads.append(g)
  return grads


def _lazy_reference(table, grads, lr, wd, adam=None, eps=1e-8):
  """float64 NumPy lazy AdamW (adam=(b1, b2)) or row-wise Adagrad (adam=None), as documented."""
  table = table.astype(np.float64).copy()
  m, v = np.zeros_like(table), np.zeros_like(table)
  count, last, sum_sq = np.zeros(N, int), np.zeros(N, int), np.zeros(N)
  for t, g in enumerate(grads, start=1):
    for n in np.flatnonzero(np.any(g != 0, axis=1)):
      decayed = table[n] * (1 - lr * wd) ** (t - last[n])
      if adam:
        b1, b2 = adam
        count[n] += 1
        m[n] = b1 * m[n] + (1 - b1) * g[n]
        v[n] = b2 * v[n] + (1 - b2) * g[n].astype(np.float64) ** 2
        direction = (m[n] / (1 - b1 ** count[n])) / (np.sqrt(v[n] / (1 - b2 ** count[n])) + eps)
      else:
        sum_sq[n] += np.mean(g[n].astype(np.float64) ** 2)
        direction = g[n] / (np.sqrt(sum_sq[n]) + eps)
      table[n] = decayed - lr * direction
      last[n] = t
  return table


def _run_transform(tx, table, grads):
  """Applies an optax transformation to {"values": table} for each gradient, under one jit."""
  params = {"values": jnp.asarray(table)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update({"values": g}, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, jnp.asarray(g))
  return np.asarray(params["values"]), state


def test_every_step_rows_equal_optax_adamw_with_a_schedule():
  rows = [1, 4]
  table = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
  grads = _grads(1, [rows] * 4)
  schedule = optax.linear_schedule(0.1, 0.02, 4)
  got, _ = _run_transform(sparse_optim.row_adamw(schedule, capacity=4, weight_decay=0.3),
                          table, grads)
  dense = optax.adamw(schedule, weight_decay=0.3)
  sub = jnp.asarray(table[rows])
  state = dense.init(sub)
  for g in grads:
    updates, state = dense.update(jnp.asarray(g[rows]), state, sub)
    sub = optax.apply_updates(sub, updates)
  np.testing.assert_allclose(got[rows], sub, rtol=2e-6, atol=1e-6)
  untouched = [0, 2, 3, 5]
  np.testing.assert_array_equal(got[untouched], table[untouched])


@pytest.mark.parametrize("adam", [(0.9, 0.95), None], ids=["adamw", "adagrad"])
def test_changing_touched_sets_match_lazy_reference(adam):
  table = np.random.default_rng(2).normal(size=(N, D)).astype(np.float32)
  grads = _grads(3, TOUCHED)
  lr, wd = 0.05, 0.5
  if adam:
    tx = sparse_optim.row_adamw(lr, capacity=3, b1=adam[0], b2=adam[1], weight_decay=wd)
  else:
    tx = sparse_optim.row_adagrad(lr, capacity=3, eps=1e-8, weight_decay=wd)
  got, state = _run_transform(tx, table, grads)
  want = _lazy_reference(table, grads, lr, wd, adam)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[[1, 3, 4]], table[[1, 3, 4]])
  leaf = state["values"]
  assert int(leaf.step) == len(TOUCHED)
  np.testing.assert_array_equal(leaf.last_step_N, [4, 0, 5, 0, 0, 4])
  if adam:
    np.testing.assert_array_equal(leaf.count_N, [2, 0, 3, 0, 0, 2])


def test_explicit_index_step_matches_reference_and_merges_repeated_reads():
  table = np.random.default_rng(4).normal(size=(N, D)).astype(np.float32)
  rng = np.random.default_rng(5)
  # Per step, 4 reads (with repeats) of the touched rows; a read's gradient is one row's part.
  reads = [np.array([0, 2, 0, 2]), np.array([5, 2, 2, 5]), np.array([0, 5, 5, 0])]
  parts = [rng.normal(size=(4, D)).astype(np.float32) for _ in reads]
  dense_grads = []
  for idx, part in zip(reads, parts):
    g = np.zeros((N, D), np.float32)
    np.add.at(g, idx, part)
    dense_grads.append(g)

  @jax.jit
  def step(table, state, idx, part):
    unique_R, grad_RD = sparse_optim.merge_rows(idx, part, N)
    return sparse_optim.row_adam_step(table, state, unique_R, grad_RD, 0.05, 0.9, 0.95,
                                      weight_decay=0.5)

  values = jnp.asarray(table)
  state = sparse_optim.init_row_adam(values)
  for idx, part in zip(reads, parts):
    values, state = step(values, state, jnp.asarray(idx, jnp.int32), jnp.asarray(part))
  want = _lazy_reference(table, dense_grads, 0.05, 0.5, (0.9, 0.95))
  np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(values)[[1, 3, 4]], table[[1, 3, 4]])


def test_merge_and_touched_rows_pad_with_n():
  idx = jnp.asarray([3, 1, 3, 0], jnp.int32)
  grad = jnp.arange(8, dtype=jnp.float32).reshape(4, 2)
  g = np.zeros((5, 2), np.float32)
  g[[1, 4]] = 1.0

  @jax.jit
  def rows(idx, grad, g):
    return (*sparse_optim.merge_rows(idx, grad, 5), sparse_optim.touched_rows(g, 3),
            sparse_optim.touched_rows(g, 1))

  unique, summed, touched3, touched1 = rows(idx, grad, jnp.asarray(g))
  np.testing.assert_array_equal(unique, [0, 1, 3, 5])
  np.testing.assert_array_equal(summed, [[6, 7], [2, 3], [4, 6], [0, 0]])
  np.testing.assert_array_equal(touched3, [1, 4, 5])
  np.testing.assert_array_equal(touched1, [1])


def test_state_shapes_and_errors():
  table = jnp.zeros((7, 4), jnp.bfloat16)
  adam = sparse_optim.init_row_adam(table)
  assert (adam.step.shape, adam.count_N.shape, adam.last_step_N.shape) == ((), (7,), (7,))
  assert adam.mu_ND.shape == adam.nu_ND.shape == (7, 4) and adam.mu_ND.dtype == jnp.float32
  adagrad = sparse_optim.init_row_adagrad(table)
  assert adagrad.last_step_N.shape == adagrad.sum_sq_N.shape == (7,)
  with pytest.raises(ValueError, match="capacity"):
    sparse_optim.row_adamw(0.1, capacity=0)
  with pytest.raises(ValueError, match=r"\(N, D\)"):
    sparse_optim.init_row_adam(jnp.zeros((3,)))


def _train_config(**overrides):
  return ml_collections.ConfigDict(dict(
      num_steps=10, learning_rate=0.1, warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.1,
      b1=0.9, b2=0.95, grad_clip=1e9, memory_value_learning_rate=None, **overrides))


def test_trainer_optimizer_switch_updates_only_read_rows():
  tx, _ = run_optim.make_optimizer(_train_config(memory_values="sparse", memory_value_rows=2))
  params = {"ffn": {"values": jnp.ones((4, 2)), "subkeys": jnp.ones((1, 2, 2, 1))},
            "w": jnp.ones((2, 2))}
  grads = jax.tree.map(jnp.ones_like, params)
  grads["ffn"]["values"] = jnp.zeros((4, 2)).at[2].set(1.0)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(updates["ffn"]["values"])[[0, 1, 3]], 0.0)
  # Step 1 of AdamW at lr 0.1 (cosine from peak), decay 0.1: -0.1 * (1 + 0.1 * 1).
  np.testing.assert_allclose(updates["ffn"]["values"][2], -0.11, rtol=1e-5)
  np.testing.assert_allclose(updates["w"], -0.11, rtol=1e-5)
  is_row_state = lambda x: isinstance(x, sparse_optim.RowAdamState)
  row_states = [x for x in jax.tree.leaves(state, is_leaf=is_row_state) if is_row_state(x)]
  assert len(row_states) == 1 and row_states[0].mu_ND.shape == (4, 2)
  with pytest.raises(ValueError, match="memory_value_rows"):
    run_optim.make_optimizer(_train_config(memory_values="sparse"))
  with pytest.raises(ValueError, match="memory_values"):
    run_optim.make_optimizer(_train_config(memory_values="lazy"))
