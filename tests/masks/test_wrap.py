"""The optax wrapper: masked weights stay exactly 0, regrowth starts at 0 with reset moments,
density is constant under DST, SR-STE's step follows its formula, masks shard like params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.masks import schedules
from sparsejax.masks import updaters as U
from sparsejax.masks.wrap import get_mask, masked, reset_like_params, wrap
from sparsejax.masks.mask import Mask
from sparsejax.sharding import make_mesh


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"d1": {"kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32)},
          "d2": {"kernel": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)}}


def _mask(params, seed=0, fan_in_d1=False):
  rng = np.random.default_rng(seed + 100)
  leaves = {"d1": {"bias": np.ones(12, bool)}, "d2": {"kernel": rng.random((12, 4)) < 0.3}}
  if fan_in_d1:
    d1 = np.zeros((16, 12), bool)
    for o in range(12):
      d1[rng.choice(16, 4, replace=False), o] = True
  else:
    d1 = rng.random((16, 12)) < 0.25
  leaves["d1"]["kernel"] = d1
  return Mask.from_leaves(leaves, {"d1/kernel": "fan_in" if fan_in_d1 else "unstructured",
                                   "d2/kernel": "unstructured"})


def _grads(params, t):
  return jax.tree.map(lambda p: jnp.cos(3.0 * p + 0.1 * t) + 0.05 * t, params)


def _moments(inner):
  """Every leaf of the inner state shaped like d1/kernel (Adam mu and nu, or the SGD trace)."""
  return [x for x in jax.tree.leaves(inner) if getattr(x, "shape", None) == (16, 12)]


def _train_and_check(tx, params, steps, fan_in_k=None):
  state = tx.init(params)
  step = jax.jit(tx.update)
  nnz0 = get_mask(state).nnz()
  changes = 0
  for t in range(steps):
    old = jax.tree.map(np.asarray, get_mask(state).leaves)
    updates, state = step(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
    mask = get_mask(state)
    assert mask.nnz() == nnz0  # density constant per leaf
    for p, m, o in zip(jax.tree.leaves(params), jax.tree.leaves(mask.leaves), jax.tree.leaves(old)):
      p, m = np.asarray(p), np.asarray(m)
      assert (p[~m] == 0).all()  # masked (including just pruned) weights are exactly 0
      grown, dropped = m & ~o, o & ~m
      assert grown.sum() == dropped.sum()
      if p.shape == (16, 12) and grown.any():
        changes += 1
        assert (p[grown] == 0).all()  # regrown weights start at exactly 0
        for moment in _moments(state.inner):  # and their optimizer moments are reset
          assert (np.asarray(moment)[grown | dropped] == 0).all()
    if fan_in_k is not None:
      np.testing.assert_array_equal(np.asarray(mask.leaves["d1"]["kernel"]).sum(axis=0), fan_in_k)
  assert changes >= 2
  return params, state


def test_rigl_with_adamw_keeps_masked_weights_zero_and_resets_moments():
  params = _params()
  tx = wrap(optax.adamw(0.05, weight_decay=0.5), U.RigL(exploration=1e-3),
              schedules.Cosine(drop_fraction=0.5, end=20, update_every=4), _mask(params))
  params, state = _train_and_check(tx, params, 24)
  assert int(state.step) == 24
  assert float(jnp.abs(params["d1"]["bias"]).sum()) > 0  # dense leaves train


def test_srigl_and_set_with_sgd_momentum_keep_fan_in_and_reset_traces():
  params = _params(1)
  mask = _mask(params, 1, fan_in_d1=True)
  sgd = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))
  tx = wrap(sgd, U.SRigL(gamma_sal=0.0), schedules.Constant(0.5, update_every=3), mask)
  _train_and_check(tx, params, 12, fan_in_k=4)
  tx = wrap(optax.sgd(0.1, momentum=0.9), U.SET(), schedules.Constant(0.5, update_every=3),
              _mask(params, 2))
  _train_and_check(tx, params, 9)


def test_gradual_magnitude_pruning_reaches_target_with_zero_weights():
  params = _params(2)
  dense = Mask.from_leaves(jax.tree.map(lambda p: np.ones(p.shape, bool), params),
                           {"d1/kernel": "unstructured", "d2/kernel": "unstructured"})
  tx = wrap(optax.adamw(0.01, weight_decay=0.1), U.Magnitude(),
              schedules.Polynomial(final_sparsity=0.75, begin=0, end=6, update_every=2), dense)
  state, step = tx.init(params), jax.jit(tx.update)
  for t in range(9):
    updates, state = step(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  mask = get_mask(state)
  assert mask.density() == {"d1/bias": 1.0, "d1/kernel": 0.25, "d2/kernel": 0.25}
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask.leaves)):
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()


def test_srste_step_matches_its_formula_and_keeps_dense_weights():
  rng = np.random.default_rng(3)
  w0 = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  params = {"k": w0}
  mask = Mask.from_leaves({"k": np.ones((8, 4), bool)}, {"k": "nm:m=4,n=2"})
  lr, lam = 0.1, 0.5
  tx = wrap(optax.sgd(lr), U.NMSRSTE(lam=lam), schedules.Constant(0.0, update_every=1), mask)
  state = tx.init(params)
  m0 = np.asarray(get_mask(state).leaves["k"])
  np.testing.assert_array_equal(m0, U.nm_mask(w0, 2, 4))  # initial mask = 2:4 of |w0|
  loss = lambda p: 0.5 * jnp.sum((p["k"] - target) ** 2)
  grads = jax.grad(loss)(get_mask(state).apply(params))  # gradient at the pruned weights
  updates, state = tx.update(grads, state, params)
  w1 = np.asarray(optax.apply_updates(params, updates)["k"])
  w0n, tn = np.asarray(w0), np.asarray(target)
  g = m0 * w0n - tn  # dL/dw~ at w~ = m ⊙ w, dense
  np.testing.assert_allclose(w1, w0n - lr * (g + lam * (1 - m0) * w0n), rtol=1e-5, atol=1e-6)
  assert (w1[~m0] != 0).all()  # pruned weights keep training
  np.testing.assert_array_equal(get_mask(state).leaves["k"], U.nm_mask(jnp.asarray(w1), 2, 4))


def test_masked_leaves_unselected_entries_bit_identical():
  params = _params(4)
  params["d2"]["kernel"] = params["d2"]["kernel"].at[0, 0].set(-0.0)
  mask = _mask(params, 4)
  inner = optax.adamw(0.1, weight_decay=0.5)
  tx = masked(inner, mask)
  state, ref_state, step = tx.init(params), inner.init(params), jax.jit(tx.update)
  ref = params
  for t in range(4):
    grads = _grads(params, t)
    updates, state = step(grads, state, params)
    new = optax.apply_updates(params, updates)
    masked_grads = mask.apply(grads)
    ref_updates, ref_state = inner.update(masked_grads, ref_state, ref)
    ref = optax.apply_updates(ref, ref_updates)
    for a, b, r, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(ref),
                          jax.tree.leaves(mask.leaves)):
      a, b, r, m = map(np.asarray, (a, b, r, m))
      np.testing.assert_array_equal(a.view(np.uint32)[~m], b.view(np.uint32)[~m])
      np.testing.assert_allclose(b[m], r[m], rtol=1e-6)
    params = new


def test_reset_like_params_zeroes_only_param_shaped_leaves():
  params = _params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1))
  state = tx.init(params)
  state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
  where = jax.tree.map(lambda p: jnp.zeros(p.shape, bool).at[0].set(True), params)
  out = reset_like_params(state, params, where)
  adam = out[1][0]
  for moment in (adam.mu, adam.nu):
    for leaf, w in zip(jax.tree.leaves(moment), jax.tree.leaves(where)):
      np.testing.assert_array_equal(np.asarray(leaf), np.where(np.asarray(w), 0.0, 1.0))
  assert int(adam.count) == 0


def test_masks_shard_like_params_under_jit():
  mesh = make_mesh(data=2, model=4)
  specs = {"d1": {"kernel": P("data", "model"), "bias": P("model")},
           "d2": {"kernel": P(None, "model")}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, P))
  params = jax.device_put(_params(), shardings)
  tx = wrap(optax.adam(0.1), U.RigL(), schedules.Constant(0.3, update_every=1), _mask(params))
  abstract = jax.eval_shape(tx.init, params)
  by_path = {jax.tree_util.keystr(k): s for (k, _), s in
             zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings))}

  def like_params(path, leaf):  # the trainer's rule: a key-path suffix names a param
    for start in range(len(path)):
      if jax.tree_util.keystr(path[start:]) in by_path and leaf.shape:
        return by_path[jax.tree_util.keystr(path[start:])]
    return NamedSharding(mesh, P())

  state_shardings = jax.tree_util.tree_map_with_path(like_params, abstract)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)  # a mask-update step
  for m, p in zip(jax.tree.leaves(get_mask(state).leaves), jax.tree.leaves(params)):
    assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding, p.sharding)
  unsharded = tx.update(jax.device_get(_grads(params, 0)), jax.device_get(tx.init(params)),
                        jax.device_get(params))[1]
  for a, b in zip(jax.tree.leaves(get_mask(state).leaves),
                  jax.tree.leaves(get_mask(unsharded).leaves)):
    np.testing.assert_array_equal(a, b)


def test_wrap_errors_name_the_problem():
  params = _params()
  with pytest.raises(ValueError, match="RigL reads a drop_fraction schedule, got a sparsity"):
    wrap(optax.sgd(0.1), U.RigL(), schedules.OneShot(0.9), _mask(params))
  tx = wrap(optax.sgd(0.1), U.Updater(), None, _mask(params))
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="no wrap state found"):
    get_mask(optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="different leaves"):
    tx.init({"d1": params["d1"]})
  # get_mask finds the state inside a chain.
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  assert get_mask(chained.init(params)).nnz() == _mask(params).nnz()


def test_masks_survive_a_checkpoint_restore_on_another_mesh(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = _params()
  tx = wrap(optax.sgd(0.1, momentum=0.9), U.SET(), schedules.Constant(0.5, update_every=1),
              _mask(params))
  state = tx.init(params)
  _, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  path = str(tmp_path / "state")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
  mesh = make_mesh(data=4, model=2)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          mesh, P("data", "model") if x.shape == (16, 12) else P())), state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  kernel = get_mask(restored).leaves["d1"]["kernel"]
  assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
  assert get_mask(restored).structures == get_mask(state).structures
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
