"""SparseGrad: orthogonal HOSVD bases vs NumPy, sparse-in-basis gradients pass, exact kept count."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.finetune import sparsegrad as sg


def _grads(seed=0, steps=3, inputs=5, outputs=4):
  return np.random.default_rng(seed).normal(size=(steps, inputs, outputs)).astype(np.float32)


def _np_basis(unfold):
  """Eigenvectors of unfold unfold^T, by descending eigenvalue (the left singular vectors)."""
  vals, vecs = np.linalg.eigh(unfold.astype(np.float64) @ unfold.T.astype(np.float64))
  return vecs[:, np.argsort(-vals)]


def test_basis_is_orthogonal_and_matches_a_numpy_hosvd():
  grads = _grads()
  u, v = sg.fit_basis(grads)
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(v.T @ v, np.eye(4), atol=1e-5)
  u_np = _np_basis(np.concatenate(list(grads), axis=1))                # I x S O
  v_np = _np_basis(np.concatenate([g.T for g in grads], axis=1))       # O x S I
  # Singular vectors agree up to sign.
  np.testing.assert_allclose(np.abs(np.asarray(u).T @ u_np), np.eye(5), atol=1e-4)
  np.testing.assert_allclose(np.abs(np.asarray(v).T @ v_np), np.eye(4), atol=1e-4)


def _setup(fraction):
  u, v = sg.fit_basis(_grads())
  params = {"mlp": {"kernel": jnp.ones((5, 4)), "bias": jnp.array([-0.0, 1.0, 2.0, 3.0])}}
  tx = sg.sparsegrad_update(optax.identity(), {"mlp/kernel": (u, v)}, fraction)
  return np.asarray(u, np.float64), np.asarray(v, np.float64), params, tx


def test_a_gradient_sparse_in_the_basis_passes_unchanged_and_other_leaves_freeze():
  u, v, params, tx = _setup(fraction=0.2)                    # k = 4 of 20
  sparse = np.zeros((5, 4))
  sparse[[0, 1, 3, 4], [2, 0, 3, 1]] = [1.5, -2.0, 0.7, 3.0]
  g = (u @ sparse @ v.T).astype(np.float32)
  grads = {"mlp": {"kernel": jnp.asarray(g), "bias": jnp.ones(4)}}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["mlp"]["kernel"], g, atol=1e-5)
  new_bias = optax.apply_updates(params, updates)["mlp"]["bias"]
  np.testing.assert_array_equal(np.asarray(new_bias).view(np.uint32),
                                np.asarray(params["mlp"]["bias"]).view(np.uint32))


def _np_sparse_step(g, u, v, k):
  """The basis-space gradient with all but its k largest |entries| zeroed, and that mask."""
  gb = u.T @ g.astype(np.float64) @ v
  order = np.argsort(-np.abs(gb).reshape(-1), kind="stable")[:k]
  keep = np.zeros(gb.size, bool)
  keep[order] = True
  keep = keep.reshape(gb.shape)
  return np.where(keep, gb, 0.0), keep


def test_kept_fraction_is_exact_and_momentum_matches_a_numpy_reference():
  u, v, params, _ = _setup(fraction=0.3)                     # k = 6 of 20
  tx = sg.sparsegrad_update(optax.sgd(0.1, momentum=0.9), {"mlp/kernel": (u, v)}, 0.3,
                            train_other=True)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  trace = np.zeros((5, 4))
  update = jax.jit(tx.update)
  for bias_trace in (1.0, 1.9):
    g = rng.normal(size=(5, 4)).astype(np.float32)
    grads = {"mlp": {"kernel": jnp.asarray(g), "bias": jnp.ones(4)}}
    updates, state = update(grads, state, params)
    gb, keep = _np_sparse_step(g, u, v, 6)
    trace = 0.9 * trace + gb
    want_basis = np.where(keep, -0.1 * trace, 0.0)
    got_basis = u.T @ np.asarray(updates["mlp"]["kernel"], np.float64) @ v
    np.testing.assert_allclose(got_basis, want_basis, atol=1e-5)
    assert np.sum(np.abs(got_basis) > 1e-4) == 6
    np.testing.assert_allclose(updates["mlp"]["bias"], np.full(4, -0.1 * bias_trace), rtol=1e-6)
  np.testing.assert_array_equal(np.sum(sg.top_fraction_mask(jnp.ones((7, 3)), 0.5)), 10)


def test_bad_arguments_are_clear_errors():
  u, v = sg.fit_basis(_grads())
  with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
    sg.sparsegrad_update(optax.identity(), {}, 0)
  tx = sg.sparsegrad_update(optax.identity(), {"nope/kernel": (u, v)}, 0.5)
  with pytest.raises(ValueError, match=r"bases name \['nope/kernel'\], which are not params"):
    tx.init({"mlp": {"kernel": jnp.ones((5, 4))}})
  with pytest.raises(ValueError, match=r"param 'mlp/bias' must be 2-D"):
    sg.fit_bases([{"mlp": {"bias": jnp.ones(4)}}], ["mlp/bias"])
  with pytest.raises(ValueError, match=r"grads must have shape \(S, I, O\)"):
    sg.fit_basis(jnp.ones((5, 4)))
