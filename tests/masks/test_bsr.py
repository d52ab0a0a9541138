"""BSR trainable weights: layout round trip, block SET / RigL against a NumPy reference, and the
block-sparse LM train step against the dense masked one (loss, gradients, AdamW + RigL step)."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.tasks import lm as lm_task
from sparsejax import masks
from sparsejax import models
from sparsejax.masks import bsr

B = 8  # block side of the tiny LM's FFN kernels [16, 32] and [32, 16]: grids 2x4 and 4x2


def dense_of(values_Zkn, slot_RC):
  """NumPy: the dense kernel, block (r, c) = values[slot[r, c]] where slot >= 0."""
  values_Zkn, slot_RC = np.asarray(values_Zkn), np.asarray(slot_RC).astype(int)
  _, bk, bn = values_Zkn.shape
  w = np.zeros((slot_RC.shape[0] * bk, slot_RC.shape[1] * bn), values_Zkn.dtype)
  for (r, c), z in np.ndenumerate(slot_RC):
    if z >= 0:
      w[r * bk:(r + 1) * bk, c * bn:(c + 1) * bn] = values_Zkn[z]
  return w


def blocks_of(w_KN, slot_RC, num_blocks):
  """NumPy: values[z] = the block of w at the position of slot z."""
  (rows, cols), (k, n) = slot_RC.shape, w_KN.shape
  bk, bn = k // rows, n // cols
  values = np.zeros((num_blocks, bk, bn), w_KN.dtype)
  for (r, c), z in np.ndenumerate(np.asarray(slot_RC).astype(int)):
    if z >= 0:
      values[z] = w_KN[r * bk:(r + 1) * bk, c * bn:(c + 1) * bn]
  return values


def expand(mask_RC, bk, bn):
  """The element mask of a block mask."""
  return np.kron(np.asarray(mask_RC, bool), np.ones((bk, bn), bool))


def block_norms_np(w_KN, grid):
  (rows, cols), (k, n) = grid, w_KN.shape
  return np.sqrt((np.asarray(w_KN, np.float64).reshape(rows, k // rows, cols, n // cols) ** 2)
                 .sum(axis=(1, 3)))


def swap_reference(values_Zkn, slot_RC, grow_RC, n):
  """NumPy block swap: drop the n least-norm kept blocks, grow the n highest scores not kept
  (ties to the lower row-major index); freed slots (ascending) go to grown blocks (row-major)."""
  slot_X = np.asarray(slot_RC).astype(int).ravel().copy()
  norm_X = block_norms_np(dense_of(values_Zkn, slot_RC), slot_RC.shape).ravel()
  kept_X = np.flatnonzero(slot_X >= 0)
  drop = sorted(kept_X, key=lambda p: (norm_X[p], p))[:n]
  grow = sorted(np.flatnonzero(slot_X < 0), key=lambda p: (-np.ravel(grow_RC)[p], p))[:n]
  freed = sorted(slot_X[drop])
  slot_X[drop] = -1
  slot_X[sorted(grow)] = freed
  values = np.array(values_Zkn)
  values[freed] = 0
  return values, slot_X.reshape(np.shape(slot_RC))


def test_from_dense_to_dense_round_trip():
  rng = np.random.default_rng(0)
  w_KN = rng.normal(size=(8, 12)).astype(np.float32)
  x_MK = rng.normal(size=(5, 8)).astype(np.float32)
  mask_RC = np.array([[1, 0, 1], [0, 1, 1]], bool)  # blocks 4 x 4
  perm = np.array([3, 0, 2, 1])

  @jax.jit
  def layouts(w_KN, x_MK):
    w = bsr.from_dense(w_KN, mask_RC)
    shuffled = bsr.BsrWeight(values_Zkn=w.values_Zkn[perm],
                             slot_RC=jnp.where(w.slot_RC >= 0, jnp.asarray(np.argsort(perm))[w.slot_RC], -1))
    return w, bsr.to_dense(w), shuffled, bsr.to_dense(shuffled), bsr.bsr_matmul(x_MK, shuffled)

  w, dense, shuffled, shuffled_dense, y_MN = jax.device_get(layouts(w_KN, x_MK))
  want_blocks, _ = masks.to_bsr(w_KN, expand(mask_RC, 4, 4), (4, 4))
  np.testing.assert_array_equal(w.values_Zkn, want_blocks)
  np.testing.assert_array_equal(w.slot_RC, [[0, -1, 1], [-1, 2, 3]])
  np.testing.assert_array_equal(dense, w_KN * expand(mask_RC, 4, 4))
  # Any slot order: a permuted slot map with permuted values is the same matrix.
  np.testing.assert_array_equal(shuffled_dense, dense_of(shuffled.values_Zkn, shuffled.slot_RC))
  np.testing.assert_array_equal(shuffled_dense, dense)
  np.testing.assert_allclose(y_MN, x_MK @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_swap_blocks_matches_numpy_reference(n):
  rng = np.random.default_rng(n)
  slot_RC = np.array([[0, -1, 1, -1], [-1, 2, -1, 3], [4, -1, -1, -1]])
  values = rng.normal(size=(5, 2, 2)).astype(np.float32)
  values[4] = values[0]  # equal norms: the lower row-major position is dropped first
  grow_RC = np.round(rng.uniform(size=(3, 4)), 1).astype(np.float32)  # ties too
  w = bsr.BsrWeight(values_Zkn=jnp.asarray(values), slot_RC=jnp.asarray(slot_RC))
  new, changed_Z = jax.jit(bsr.swap_blocks)(w, jnp.asarray(grow_RC), n)
  want_values, want_slots = swap_reference(values, slot_RC, grow_RC, n)
  np.testing.assert_array_equal(new.slot_RC, want_slots)
  np.testing.assert_array_equal(new.values_Zkn, want_values)
  assert int(np.sum(np.asarray(new.slot_RC) >= 0)) == 5 and int(changed_Z.sum()) == n


def test_swap_hand_worked():
  """Slots 0..2 at (0,0), (0,1), (1,1); slot 1 is the smallest block, (1,0) scores highest."""
  w = bsr.BsrWeight(values_Zkn=jnp.array([[[3.0]], [[0.5]], [[-2.0]]]),
                    slot_RC=jnp.array([[0, 1], [-1, 2]]))
  new, changed_Z = jax.jit(bsr.swap_blocks)(w, jnp.array([[9.0, 9.0], [5.0, 0.0]]), 1)
  np.testing.assert_array_equal(new.slot_RC, [[0, -1], [1, 2]])
  np.testing.assert_array_equal(new.values_Zkn[:, 0, 0], [3.0, 0.0, -2.0])
  np.testing.assert_array_equal(changed_Z, [False, True, False])


def tiny_lm(ffn):
  config = ml_collections.ConfigDict({"d_model": 16, "num_layers": 1, "num_heads": 2,
                                      "d_ff": 32, "max_len": 8, "ffn": ffn})
  return models.build_lm(config, vocab_size=11)


def loss_fn(model, params, tokens):
  logits, _ = model.apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def lm_pair():
  """The block-sparse tiny LM and the dense one on the same weights (its FFN kernels dense and
  masked): params, element masks, and (loss, grads) of each, all jitted."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 11)
  sparse_model = tiny_lm({"name": "block_sparse", "block": (B, B), "density": 0.5})
  dense_model = tiny_lm({"name": "dense"})
  params = jax.jit(sparse_model.init)(jax.random.PRNGKey(0), tokens[:, :-1])
  params = jax.device_get(nn.meta.unbox(params)["params"])
  dense_params = jax.tree.map(np.array, params)
  ffn = dense_params["layer_0"]["ffn"]
  kernel_masks = {}
  for name in ("wi", "wo"):
    kernel_masks[name] = expand(ffn[name]["slots"] >= 0, B, B)
    ffn[name] = dense_of(ffn[name]["blocks"], ffn[name]["slots"])
  grad = lambda model: jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, tokens)))
  return types.SimpleNamespace(
      params=params, dense_params=dense_params, kernel_masks=kernel_masks,
      sparse=jax.device_get(grad(sparse_model)(params)),
      dense=jax.device_get(grad(dense_model)(dense_params)))


def test_bsr_loss_and_grads_equal_dense_masked(lm_pair):
  (loss, grads), (want_loss, want_grads) = lm_pair.sparse, lm_pair.dense
  jax.tree.map(np.testing.assert_array_equal, jax.jit(bsr.to_dense_params)(lm_pair.params),
               lm_pair.dense_params)
  grads, want_grads = jax.tree.map(np.array, (grads, want_grads))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for name, mask in lm_pair.kernel_masks.items():
    got, slots = grads["layer_0"]["ffn"].pop(name), lm_pair.params["layer_0"]["ffn"][name]["slots"]
    want_KN = want_grads["layer_0"]["ffn"].pop(name)
    np.testing.assert_allclose(dense_of(got["blocks"], slots), want_KN * mask, rtol=1e-5,
                               atol=1e-7)
    # probe = 1 at init: the slots' gradient is the dense gradient's block norms (RigL scores).
    np.testing.assert_allclose(got["slots"], block_norms_np(want_KN, slots.shape), rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
               grads, want_grads)


def adamw_first_step_np(params, grads, lr, clip, weight_decay, eps=1e-8):
  """NumPy: the first step of clip_by_global_norm(clip) then optax.adamw (b1 = 0.9, b2 = 0.999,
  decay on >= 2-D leaves): bias-corrected m / sqrt(v) = g / (|g| + eps) at step 1."""
  norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
  scale = min(1.0, clip / norm)
  step = lambda p, g: g * scale / (np.abs(g * scale) + eps) + weight_decay * p * (p.ndim >= 2)
  return jax.tree.map(lambda p, g: p - lr * step(p, g), params, grads)


def test_block_wrap_adamw_rigl_step_equals_dense_masked(lm_pair):
  """One clipped-AdamW step with a RigL update at step 0, against the dense masked step (NumPy)
  and a NumPy RigL on block scores (drop by the post-step block norm, grow by the dense
  gradient's)."""
  params, dense_params = lm_pair.params, lm_pair.dense_params
  decay = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # as experiments.optim
  adamw = optax.chain(optax.clip_by_global_norm(0.05),
                      optax.adamw(0.1, weight_decay=0.1, mask=decay))
  schedule = masks.Constant(value=0.5, update_every=10)  # n = min(round(0.5 * 4), 8 - 4) = 2
  tx = bsr.block_wrap(adamw, "rigl", schedule)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(lm_pair.sparse[1], state, params)
  new = jax.device_get(optax.apply_updates(params, updates))

  dense_grads = jax.tree.map(np.array, lm_pair.dense[1])
  ffn_grads = dense_grads["layer_0"]["ffn"]
  scores = {k: block_norms_np(ffn_grads[k], params["layer_0"]["ffn"][k]["slots"].shape)
            for k in lm_pair.kernel_masks}
  for k, m in lm_pair.kernel_masks.items():
    ffn_grads[k] = ffn_grads[k] * m
  dense_new = adamw_first_step_np(dense_params, dense_grads, 0.1, 0.05, 0.1)
  mu = state.inner[1][0].mu["layer_0"]["ffn"]
  for k in lm_pair.kernel_masks:
    got, old = new["layer_0"]["ffn"].pop(k), params["layer_0"]["ffn"][k]
    stepped_Zkn = blocks_of(dense_new["layer_0"]["ffn"].pop(k), old["slots"], 4)
    want_values, want_slots = swap_reference(stepped_Zkn, old["slots"], scores[k], 2)
    np.testing.assert_array_equal(got["slots"], want_slots)
    np.testing.assert_allclose(dense_of(got["blocks"], got["slots"]),
                               dense_of(want_values, want_slots), rtol=1e-4, atol=1e-6)
    assert float(got["probe"]) == 0.0  # the next step updates nothing
    # Adam moments of the two swapped slots restart at 0; the others hold the step's gradient.
    swapped_Z = np.zeros(4, bool)
    swapped_Z[old["slots"][(old["slots"] >= 0) & (want_slots < 0)].astype(int)] = True
    moment_Z = np.abs(np.asarray(mu[k]["blocks"])).sum(axis=(1, 2))
    assert np.all(moment_Z[swapped_Z] == 0) and np.all(moment_Z[~swapped_Z] > 0)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), new,
               dense_new)


def test_block_wrap_set_moves_every_block_and_keeps_the_count():
  """Drop fraction 1 on a 2x4 grid with 4 blocks: all 4 move to the 4 free blocks, slots 0..3."""
  slots = np.array([[0, -1, 1, -1], [-1, 2, -1, 3]], np.float32)
  params = {"k": {"blocks": jnp.ones((4, 2, 2)), "slots": jnp.asarray(slots),
                  "probe": jnp.zeros(())}}
  tx = bsr.block_wrap(optax.sgd(0.1), "set", masks.Constant(value=1.0, update_every=1))
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  new = jax.device_get(optax.apply_updates(params, updates))["k"]
  np.testing.assert_array_equal(new["slots"] >= 0, slots < 0)
  assert sorted(new["slots"][new["slots"] >= 0]) == [0, 1, 2, 3]
  np.testing.assert_array_equal(new["blocks"], 0.0)  # grown blocks start at 0
  assert float(new["probe"]) == 0.0  # SET reads no dense gradient


def test_lm_task_wraps_only_block_sparse_ffns():
  config = ml_collections.ConfigDict({
      "seed": 0, "model": {"ffn": {"name": "block_sparse"}},
      "sparsity": {"enabled": False, "updater": {"name": "set"},
                   "schedule": {"name": "constant", "value": 0.1, "update_every": 5}}})
  task = types.SimpleNamespace(config=config)
  tx = optax.sgd(0.1)
  assert lm_task.LanguageModel.wrap_optimizer(task, tx) is not tx
  config.model.ffn.name = "dense"
  assert lm_task.LanguageModel.wrap_optimizer(task, tx) is tx
  config.model.ffn.name, config.sparsity.enabled = "block_sparse", True
  with pytest.raises(ValueError, match="sparsity.enabled=True"):
    lm_task.LanguageModel.wrap_optimizer(task, tx)
