"""Kernel selection: NTK scores vs a closed form, bi-level budgets by hand, masked training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.finetune import kernel_select as ks
from sparsejax.masks.wrap import masked


def _mlp(params, x_ND):
  """f = tanh(x W1 + b1) W2 + b2."""
  h = jnp.tanh(x_ND @ params["l1"]["kernel"] + params["l1"]["bias"])
  return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def _tiny(seed=0):
  rng = np.random.default_rng(seed)
  params = {"l1": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4) * 0.1},
            "l2": {"kernel": rng.normal(size=(4, 2)), "bias": np.zeros(2)}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  batches = [jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(2)]
  return params, batches


def test_ntk_scores_match_the_closed_form_jacobian():
  params, batches = _tiny()
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.concatenate([np.asarray(b, np.float64) for b in batches])          # N = 10
  h = np.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])                      # N x 4
  dh2 = (1 - h**2) ** 2
  w2sq = np.sum(p["l2"]["kernel"] ** 2, axis=1)                              # sum_c W2_jc^2
  # df_c/dW2_jc = h_j, df_c/db2_c = 1, df_c/db1_j = W2_jc h'_j, df_c/dW1_ij = x_i W2_jc h'_j.
  want = {"l1": {"kernel": (x**2).T @ dh2 * w2sq, "bias": dh2.sum(0) * w2sq},
          "l2": {"kernel": np.repeat(np.sum(h**2, 0)[:, None], 2, axis=1),
                 "bias": np.full(2, float(len(x)))}}
  got = ks.ntk_scores(_mlp, params, batches)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5), got, want)


def test_budget_split_by_hand():
  # shares 3.6, 1.8, 0.6 -> floors 3, 1, 0; remainders .6, .8, .6 -> layer 1, then layer 0.
  assert ks.allocate_budget([6.0, 3.0, 1.0], [10, 2, 10], 6) == [4, 2, 0]
  # shares 0.6, 5.4: layer 1 is capped at its size 2, the other 4 go to layer 0.
  assert ks.allocate_budget([1.0, 9.0], [10, 2], 6) == [4, 2]
  # no mass at all: split by size.
  assert ks.allocate_budget([0.0, 0.0], [3, 1], 2) == [2, 0]
  with pytest.raises(ValueError, match=r"k must be in \[0, 4\]"):
    ks.allocate_budget([1.0, 1.0], [3, 1], 5)
  with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got 1.5"):
    ks.competition_mask({"a": jnp.ones(3)}, 1.5)


def test_competition_mask_picks_bi_level_winners():
  scores = {"a": jnp.array([[5.0, 0.0], [1.0, 0.0]]),     # mass 6
            "b": jnp.array([2.0, 2.0, 0.5, 0.0])}          # mass 4.5; k = round(0.5 * 8) = 4
  mask = ks.competition_mask(scores, 0.5)
  # shares 4 * 6 / 10.5 = 2.29, 1.71 -> floors 2, 1; remainder to b. Ties go to lower index.
  np.testing.assert_array_equal(mask["a"], [[True, False], [True, False]])
  np.testing.assert_array_equal(mask["b"], [True, True, False, False])


def test_only_selected_params_change_under_the_masked_optimizer():
  params, batches = _tiny(1)
  mask = ks.competition_mask(ks.ntk_scores(_mlp, params, batches), 0.25)
  assert sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) == round(0.25 * 22)
  tx = masked(optax.adam(0.1), mask)
  x, y = batches[0], jnp.ones((5, 2))

  @jax.jit
  def step(p, state):
    grads = jax.grad(lambda q: jnp.mean((_mlp(q, x) - y) ** 2))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  new, state = params, tx.init(params)
  for _ in range(3):
    new, state = step(new, state)
  for old, upd, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask)):
    old, upd, m = np.asarray(old), np.asarray(upd), np.asarray(m)
    np.testing.assert_array_equal(upd.view(np.uint32)[~m], old.view(np.uint32)[~m])
    assert np.all(upd[m] != old[m])
