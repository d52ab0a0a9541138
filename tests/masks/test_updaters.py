"""Mask updaters against hand-worked cases and naive numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks import regularizers
from sparsejax.masks import updaters as U
from sparsejax.masks.mask import Mask
from sparsejax.masks.schedules import Polynomial


def _rng(seed=0):
  return np.random.default_rng(seed)


def _random_mask(rng, shape, density):
  flat = np.zeros(int(np.prod(shape)), bool)
  flat[rng.choice(flat.size, int(round(density * flat.size)), replace=False)] = True
  return flat.reshape(shape)


def _fan_in_mask(rng, shape, k):
  mask = np.zeros(shape, bool)
  for o in range(shape[-1]):
    mask[rng.choice(shape[-2], k, replace=False), o] = True
  return mask


def ref_rigl(w, g, mask, n):
  """Naive RigL: drop the n smallest |w| among active, grow the n largest |g| among inactive."""
  new = mask.reshape(-1).copy()
  active, inactive = np.flatnonzero(mask), np.flatnonzero(~mask)
  new[active[np.argsort(np.abs(w.reshape(-1)[active]), kind="stable")[:n]]] = False
  new[inactive[np.argsort(-np.abs(g.reshape(-1)[inactive]), kind="stable")[:n]]] = True
  return new.reshape(mask.shape)


# ------------------------------------------------------------------------------- primitives


def test_grow_and_drop_by_hand():
  score = jnp.array([3.0, 1.0, 2.0, 2.0, 5.0])
  allowed = jnp.array([True, True, True, True, False])
  np.testing.assert_array_equal(U.grow_highest(score, allowed, 2), [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(U.drop_lowest(score, allowed, 2), [1, 0, 0, 1, 0])
  # Per column (axis -2): column 0 keeps its top 1, column 1 its top 2.
  score_IO = jnp.array([[1.0, 4.0], [3.0, 2.0], [2.0, 3.0]])
  kept = U.grow_highest(score_IO, jnp.ones((3, 2), bool), jnp.array([[1, 2]]), axis=-2)
  np.testing.assert_array_equal(kept, [[0, 1], [1, 0], [0, 1]])


@pytest.mark.parametrize("seed, shape, density, n", [(0, (12, 10), 0.3, 5), (1, (3, 8, 6), 0.2, 9),
                                                     (2, (20, 5), 0.5, 50)])
def test_rigl_matches_numpy_reference(seed, shape, density, n):
  rng = _rng(seed)
  w, g = rng.normal(size=shape), rng.normal(size=shape)
  mask = _random_mask(rng, shape, density)
  n = min(n, int(mask.sum()), int((~mask).sum()))
  got = jax.jit(U.rigl_update)(w, g, mask, jnp.int32(n))  # traced count
  np.testing.assert_array_equal(got, ref_rigl(w, g, mask, n))


def test_set_drops_smallest_and_grows_only_inactive():
  rng = _rng(3)
  w, mask = rng.normal(size=(16, 8)), _random_mask(rng, (16, 8), 0.25)
  new = np.asarray(U.set_update(w, mask, 7, jax.random.PRNGKey(0)))
  dropped, grown = mask & ~new, new & ~mask
  assert dropped.sum() == grown.sum() == 7
  np.testing.assert_array_equal(dropped, mask & ~ref_rigl(w, np.zeros_like(w), mask, 7) & mask)


def _run_rounds(update, w, mask, rounds, n_of):
  nnz0 = int(mask.sum())
  for r in range(rounds):
    key = jax.random.PRNGKey(r)
    w = w + jax.random.normal(key, w.shape) * 0.5
    g = jax.random.normal(jax.random.fold_in(key, 1), w.shape)
    new = update(w, g, mask, key)
    dropped, grown = np.asarray(mask & ~new), np.asarray(new & ~mask)
    assert int(new.sum()) == nnz0
    assert dropped.sum() == grown.sum() == n_of(mask)
    mask = new
  return np.asarray(mask)


def test_set_and_rigl_keep_density_and_swap_equal_counts_over_many_rounds():
  rng = _rng(4)
  w, mask = jnp.asarray(rng.normal(size=(24, 16))), jnp.asarray(_random_mask(rng, (24, 16), 0.1))
  frac = 0.3
  n = int(U.swap_count(frac, mask))
  assert n == round(0.3 * int(mask.sum()))
  set_fn = jax.jit(lambda w, g, m, k: U.set_update(w, m, U.swap_count(frac, m), k))
  rigl_fn = jax.jit(lambda w, g, m, k: U.rigl_update(w, g, m, U.swap_count(frac, m)))
  _run_rounds(set_fn, w, mask, 10, lambda m: n)
  _run_rounds(rigl_fn, w, mask, 10, lambda m: n)


def test_fan_in_swaps_keep_exact_fan_in_per_neuron():
  rng = _rng(5)
  k, shape = 3, (2, 12, 7)  # leading batch axis of neurons
  mask = jnp.asarray(np.stack([_fan_in_mask(rng, shape[1:], k) for _ in range(2)]))
  w = jnp.asarray(rng.normal(size=shape))
  n_col = int(U.swap_count(0.5, mask, axis=-2))
  assert n_col == round(0.5 * k)
  fns = [
      jax.jit(lambda w, g, m, key: U.set_update(w, m, U.swap_count(0.5, m, -2), key, axis=-2)),
      jax.jit(lambda w, g, m, key: U.rigl_update(w, g, m, U.swap_count(0.5, m, -2), axis=-2)),
      jax.jit(lambda w, g, m, key: U.srigl_update(w, g, m, 0.5, gamma_sal=0.0)),
  ]
  for fn in fns:
    final = _run_rounds(fn, w, mask, 6, lambda m: n_col * 2 * 7)
    np.testing.assert_array_equal(final.sum(axis=-2), k)


def test_srigl_ablates_a_neuron_without_salient_weights_by_hand():
  # Column 2's weights are the smallest and its inactive inputs have zero gradient: layer-wide
  # RigL (n = round(0.5 * 6) = 3) keeps or grows none of its weights, so it is ablated, and the
  # target 6 is spread over 2 live neurons: fan-in 3, each drops 1 and grows 2.
  w = np.zeros((4, 3))
  w[0, 0], w[1, 0], w[0, 1], w[1, 1], w[2, 2], w[3, 2] = 1.0, 0.2, 2.0, 3.0, 0.01, 0.02
  mask = w != 0
  g = np.zeros((4, 3))
  g[2, 0], g[3, 0], g[2, 1], g[3, 1] = 5.0, 4.0, 6.0, 0.5
  srigl = jax.jit(U.srigl_update, static_argnames="gamma_sal")
  got = srigl(w, g, mask, 0.5, target_nnz=6, gamma_sal=0.3)
  expected = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0]], bool)
  np.testing.assert_array_equal(got, expected)
  # Without ablation every neuron swaps round(0.5 * 2) = 1 (ties go to the lower row).
  got = srigl(w, g, mask, 0.5, target_nnz=6, gamma_sal=0.0)
  expected = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------- pruning


def test_magnitude_prune_unstructured_matches_numpy():
  rng = _rng(6)
  w, mask = rng.normal(size=(10, 10)), _random_mask(rng, (10, 10), 0.6)
  got = np.asarray(U.magnitude_prune(w, mask, 0.25))
  active = np.flatnonzero(mask)
  keep = active[np.argsort(-np.abs(w.reshape(-1)[active]), kind="stable")[:25]]
  expected = np.zeros(100, bool)
  expected[keep] = True
  np.testing.assert_array_equal(got, expected.reshape(10, 10))


def test_magnitude_prune_structures_keep_exact_units():
  rng = _rng(7)
  w = rng.normal(size=(8, 6))
  ones = np.ones((8, 6), bool)
  fan = np.asarray(U.magnitude_prune(w, ones, 0.25, "fan_in"))
  np.testing.assert_array_equal(fan.sum(axis=0), 2)
  for o in range(6):  # the 2 largest |w| of each column
    np.testing.assert_array_equal(np.sort(np.flatnonzero(fan[:, o])),
                                  np.sort(np.argsort(-np.abs(w[:, o]))[:2]))
  chan = np.asarray(U.magnitude_prune(w, ones, 0.5, "channel", power=2.0))
  norms = np.linalg.norm(w, axis=0)
  np.testing.assert_array_equal(chan, np.broadcast_to(norms >= np.sort(norms)[3], (8, 6)))
  block = np.asarray(U.magnitude_prune(w, ones, 0.5, "block:block=2x2", power=2.0))
  tiles = block.reshape(4, 2, 3, 2)
  whole_blocks = tiles.all(axis=(1, 3))
  assert whole_blocks.sum() == 6 and (whole_blocks == tiles.any(axis=(1, 3))).all()


def test_magnitude_updater_follows_the_polynomial_schedule_to_per_leaf_targets():
  rng = _rng(8)
  params = {"a": jnp.asarray(rng.normal(size=(20, 10))), "b": jnp.asarray(rng.normal(size=(10, 4))),
            "bias": jnp.zeros(4)}
  mask = Mask.from_leaves(jax.tree.map(lambda p: np.ones(p.shape, bool), params),
                          {"a": "unstructured", "b": "unstructured"})
  densities = {"a": 0.05, "b": 0.4}  # global: (10 + 16) / 240
  updater = U.Magnitude(densities=densities)
  updater.check(mask)
  final = 1 - 26 / 240
  schedule = Polynomial(final_sparsity=final, begin=0, end=40, update_every=10)
  previous = None
  prune = jax.jit(lambda mask, value: updater.update(
      U.UpdateInputs(params=params, mask=mask, value=value)).mask)
  for t in range(0, 41, 10):
    value, update = schedule(t)
    assert bool(update)
    mask = prune(mask, value)
    kept = np.asarray(mask.leaves["a"]).sum() + np.asarray(mask.leaves["b"]).sum()
    assert abs(kept - round(240 * (1 - float(value)))) <= 1  # per-leaf rounding
    if previous is not None:  # pruned weights never come back
      assert not (np.asarray(mask.leaves["a"]) & ~previous).any()
    previous = np.asarray(mask.leaves["a"])
  assert mask.density() == {"a": 0.05, "b": 0.4, "bias": 1.0}


def test_global_magnitude_keeps_the_global_count():
  rng = _rng(9)
  params = {"a": jnp.asarray(rng.normal(size=(10, 10))),
            "b": jnp.asarray(3 * rng.normal(size=(5, 4)))}
  mask = Mask.from_leaves(jax.tree.map(lambda p: np.ones(p.shape, bool), params),
                          {"a": "unstructured", "b": "unstructured"})
  new = U.Magnitude(scope="global").update(
      U.UpdateInputs(params=params, mask=mask, value=jnp.float32(0.9))).mask
  assert sum(new.nnz().values()) == 12
  everything = np.concatenate([np.abs(params["a"]).reshape(-1), np.abs(params["b"]).reshape(-1)])
  threshold = np.sort(everything)[-12]
  for k in params:
    np.testing.assert_array_equal(new.leaves[k], np.abs(params[k]) >= threshold)


def test_apportion_by_hand():
  apportion = jax.jit(U.apportion)
  # shares 2.5, 2.5, 5 -> floors 2, 2, 5 and the spare 1 to the first of the tied remainders.
  np.testing.assert_array_equal(apportion(10, jnp.array([1.0, 1.0, 2.0]), jnp.array([99] * 3)),
                                [3, 2, 5])
  # Layer 0 is capped at 3; its excess 7 is split evenly over the others (zero weight -> uniform).
  np.testing.assert_array_equal(apportion(10, jnp.array([1.0, 0.0, 0.0]), jnp.array([3, 10, 10])),
                                [3, 4, 3])
  np.testing.assert_array_equal(apportion(50, jnp.array([1.0, 1.0, 1.0]), jnp.array([3, 4, 0])),
                                [3, 4, 0])


def test_sparse_momentum_redistributes_by_mean_momentum_by_hand():
  w = [jnp.arange(1.0, 11.0), jnp.arange(1.0, 11.0)]
  masks = [jnp.arange(10) < 4, jnp.arange(10) < 4]
  moms = [jnp.where(masks[0], 3.0, jnp.arange(10.0)), jnp.where(masks[1], 1.0, -jnp.arange(10.0))]
  # Each layer drops round(0.5 * 4) = 2 (weights 1, 2); R = 4 goes 3 : 1 by mean |mom| 3 : 1.
  new = jax.jit(U.sparse_momentum_update)(w, moms, masks, 0.5)
  np.testing.assert_array_equal(new[0], [0, 0, 1, 1, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(new[1], [0, 0, 1, 1, 0, 0, 0, 0, 0, 1])


def test_sparse_momentum_keeps_the_global_count_over_rounds():
  rng = _rng(10)
  shapes = [(16, 8), (8, 8), (8, 3)]
  masks = [jnp.asarray(_random_mask(rng, s, 0.2)) for s in shapes]
  total = sum(int(m.sum()) for m in masks)
  fn = jax.jit(U.sparse_momentum_update)
  for r in range(5):
    ws = [jnp.asarray(rng.normal(size=s)) for s in shapes]
    moms = [jnp.asarray(rng.normal(size=s) * (i + 1)) for i, s in enumerate(shapes)]
    masks = fn(ws, moms, masks, 0.3)
    assert sum(int(m.sum()) for m in masks) == total


# ------------------------------------------------------------------------------- N:M


def test_nm_mask_keeps_exactly_n_largest_per_group():
  rng = _rng(11)
  w = rng.normal(size=(3, 8, 5))
  mask = np.asarray(U.nm_mask(w, 2, 4))
  groups = mask.reshape(3, 2, 4, 5)
  np.testing.assert_array_equal(groups.sum(axis=2), 2)
  abs_groups = np.abs(w).reshape(3, 2, 4, 5)
  for idx in np.ndindex(3, 2, 5):
    column = abs_groups[idx[0], idx[1], :, idx[2]]
    np.testing.assert_array_equal(np.flatnonzero(groups[idx[0], idx[1], :, idx[2]]),
                                  np.sort(np.argsort(-column)[:2]))


def test_srste_and_pgf_gradients_match_their_formulas():
  rng = _rng(12)
  w, g = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
  mask = np.asarray(U.nm_mask(w, 2, 4))
  lam = 0.3
  expected = g + lam * (1 - mask) * w  # g + λ_W (1 − m) ⊙ w
  np.testing.assert_allclose(U.srste_grads(jnp.asarray(g), jnp.asarray(w), mask, lam), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(U.pgf_grads(jnp.asarray(g), mask, 0.25),
                             g * (mask + 0.25 * (1 - mask)), rtol=1e-6)
  np.testing.assert_allclose([float(U.linear_decay(t, 10, 20)) for t in (0, 10, 15, 20, 30)],
                             [1.0, 1.0, 0.5, 0.0, 0.0])
  nm = Mask.from_leaves({"k": mask}, {"k": "nm:m=4,n=2"})
  pgf = U.NMPGF(decay_begin=0, decay_end=10).grads(
      U.UpdateInputs(params={"k": w}, mask=nm, grads={"k": jnp.asarray(g)}, step=5))
  np.testing.assert_allclose(pgf["k"], g * (mask + 0.5 * (1 - mask)), rtol=1e-6)


# ------------------------------------------------------------------------------- regularisers


def test_group_lasso_penalty_and_gradient_match_a_loop():
  rng = _rng(13)
  w = rng.normal(size=(4, 6))
  channel = sum(np.sqrt(4) * np.linalg.norm(w[:, o]) for o in range(6))
  block = sum(np.sqrt(4) * np.linalg.norm(w[r:r + 2, c:c + 2]) for r in (0, 2) for c in (0, 2, 4))
  np.testing.assert_allclose(regularizers.group_lasso_penalty(w, "channel"), channel, rtol=1e-5)
  np.testing.assert_allclose(regularizers.group_lasso_penalty(w, "block", (2, 2)), block, rtol=1e-5)
  for group, block_arg in [("channel", None), ("block", 2)]:
    auto = jax.grad(lambda x: regularizers.group_lasso_penalty(x, group, block_arg))(jnp.asarray(w))
    closed = regularizers.group_lasso_grad(jnp.asarray(w), group, block_arg)
    np.testing.assert_allclose(closed, auto, rtol=1e-5)
  w[:, 1] = 0.0  # an all-zero group has zero (sub)gradient
  np.testing.assert_array_equal(regularizers.group_lasso_grad(w, "channel")[:, 1], 0.0)


def test_hypersparse_gradient_matches_closed_form():
  rng = _rng(14)
  w = rng.normal(size=50).astype(np.float32)
  kappa = 0.8
  s = 0.6585 / np.sort(np.abs(w))[40]
  expected = (np.sign(w) * s * (1 - np.tanh(s * np.abs(w)) ** 2) * np.abs(w).sum()
              / np.tanh(s * np.abs(w)).sum())
  np.testing.assert_allclose(regularizers.hypersparse_grad(w, kappa), expected, rtol=1e-5)
  auto = jax.grad(lambda x: regularizers.hypersparse_penalty(x, kappa))(jnp.asarray(w))
  np.testing.assert_allclose(auto, expected, rtol=1e-4)
  assert abs(float(regularizers.hypersparse_penalty(w, kappa))) < 1e-4
  # The penalty's pull shrinks as |w| grows: small weights are regularised the most.
  pull = np.abs(expected)[np.argsort(np.abs(w))]
  assert (np.diff(pull) <= 1e-6).all()


def test_group_lasso_updater_penalises_and_prunes_whole_channels():
  rng = _rng(15)
  params = {"k": jnp.asarray(rng.normal(size=(6, 4))), "bias": jnp.zeros(4)}
  mask = Mask.from_leaves({"k": np.ones((6, 4), bool), "bias": np.ones(4, bool)}, {"k": "channel"})
  updater = U.GroupLasso(lam=0.1)
  updater.check(mask)
  grads = jax.tree.map(jnp.ones_like, params)
  got = updater.grads(U.UpdateInputs(params=params, mask=mask, grads=grads))
  np.testing.assert_allclose(got["k"], 1 + 0.1 * np.sqrt(6) * params["k"]
                             / np.linalg.norm(params["k"], axis=0), rtol=1e-5)
  np.testing.assert_array_equal(got["bias"], 1.0)
  new = updater.update(U.UpdateInputs(params=params, mask=mask, grads=grads,
                                      value=jnp.float32(0.5))).mask
  norms = np.linalg.norm(params["k"], axis=0)
  kept = np.broadcast_to(norms >= np.sort(norms)[2], (6, 4))
  np.testing.assert_array_equal(new.leaves["k"], kept)


def test_hypersparse_updater_adds_growing_penalty_and_prunes_globally():
  rng = _rng(16)
  params = {"a": jnp.asarray(rng.normal(size=(8, 8))), "b": jnp.asarray(rng.normal(size=(8, 2)))}
  mask = Mask.from_leaves(jax.tree.map(lambda p: np.ones(p.shape, bool), params),
                          {"a": "unstructured", "b": "unstructured"})
  updater = U.HyperSparse(sparsity=0.9, lam=1.0, eta=2.0, epoch_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  flat = np.concatenate([params["a"].reshape(-1), params["b"].reshape(-1)])
  hs = np.asarray(regularizers.hypersparse_grad(flat, 0.9))
  g25 = jax.jit(updater.grads)(U.UpdateInputs(params=params, mask=mask, grads=zeros,
                                               step=25))  # λ_t = 1 * 2^2
  np.testing.assert_allclose(g25["a"].reshape(-1), 4 * hs[:64], rtol=1e-5)
  np.testing.assert_allclose(g25["b"].reshape(-1), 4 * hs[64:], rtol=1e-5)
  new = jax.jit(updater.update)(U.UpdateInputs(params=params, mask=mask, grads=zeros,
                                                value=jnp.float32(0.9))).mask
  assert sum(new.nnz().values()) == round(0.1 * 80)


# ------------------------------------------------------------------------------- errors


def test_updaters_name_unsupported_structures():
  mask = Mask.from_leaves({"k": np.ones((4, 4), bool)}, {"k": "block:block=2x2"})
  with pytest.raises(ValueError, match="RigL supports structures .* leaf 'k' has structure 'block"):
    U.RigL().check(mask)
  with pytest.raises(ValueError, match="NMSRSTE supports structures"):
    U.NMSRSTE().check(mask)
  with pytest.raises(ValueError, match=r"densities has no entry for sparse leaves \['k'\]"):
    U.Magnitude(densities={}).check(mask)
  with pytest.raises(ValueError, match="unknown mask updater 'lottery'"):
    U.make_updater("lottery")
  with pytest.raises(ValueError, match="N:M sparsity needs 0 < N <= M, got N=5, M=4"):
    U.nm_mask(jnp.ones((8, 2)), 5, 4)
