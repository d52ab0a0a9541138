"""SAM on normalisation layers: the ascent step perturbs only matched leaves, normalised over
them; the gradient at the perturbed point matches a hand computation on a quadratic loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.masks.sam_on import sam, sam_gradient, sam_perturbation

A = np.array([1.0, 2.0, 3.0], np.float32)
B = np.array([0.5, 4.0], np.float32)


def _params():
  return {"block": {"ffn_norm": {"scale": jnp.asarray([1.0, -2.0, 0.5])},
                    "dense": {"kernel": jnp.asarray([3.0, 1.0])}}}


def _loss(params, batch):
  """½ Σ a s² + ½ Σ b w² + c (Σ s)(Σ w): the cross term lets the perturbation of s reach ∇w."""
  s, w = params["block"]["ffn_norm"]["scale"], params["block"]["dense"]["kernel"]
  return 0.5 * jnp.sum(A * s**2) + 0.5 * jnp.sum(B * w**2) + batch * jnp.sum(s) * jnp.sum(w)


def _hand_sam(rho, c):
  s, w = np.array([1.0, -2.0, 0.5]), np.array([3.0, 1.0])
  g_s = A * s + c * w.sum()
  s_adv = s + rho * g_s / np.linalg.norm(g_s)  # only the norm scale moves; ‖g_S‖ over it alone
  return A * s_adv + c * w.sum(), B * w + c * s_adv.sum()


def test_sam_gradient_matches_the_hand_computed_quadratic():
  grads = sam_gradient(_loss, _params(), 0.3, rho=0.1)
  want_s, want_w = _hand_sam(0.1, 0.3)
  np.testing.assert_allclose(grads["block"]["ffn_norm"]["scale"], want_s, rtol=1e-5)
  np.testing.assert_allclose(grads["block"]["dense"]["kernel"], want_w, rtol=1e-5)


def test_unmatched_leaves_are_not_perturbed_and_rho_zero_is_the_plain_gradient():
  g = {"a_norm": {"scale": jnp.asarray([3.0, 4.0])}, "dense": {"kernel": jnp.asarray([7.0])}}
  eps = sam_perturbation(g, 0.5)
  np.testing.assert_allclose(eps["a_norm"]["scale"], [0.3, 0.4], rtol=1e-6)  # 0.5 · g / 5
  np.testing.assert_array_equal(eps["dense"]["kernel"], [0.0])
  plain = jax.grad(_loss)(_params(), 0.3)
  got = sam_gradient(_loss, _params(), 0.3, rho=0.0)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, plain)


def test_optax_form_feeds_the_sam_gradient_to_the_inner_optimizer():
  params = _params()
  tx = sam(optax.sgd(1.0), rho=0.1)
  state = tx.init(params)
  grads = jax.grad(_loss)(params, 0.3)
  updates, _ = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(_loss)(p, 0.3))
  want_s, want_w = _hand_sam(0.1, 0.3)
  np.testing.assert_allclose(updates["block"]["ffn_norm"]["scale"], -want_s, rtol=1e-5)
  np.testing.assert_allclose(updates["block"]["dense"]["kernel"], -want_w, rtol=1e-5)


def test_rejects_a_rule_matching_nothing_and_a_missing_grad_fn():
  with pytest.raises(ValueError, match="matches no leaf"):
    sam_perturbation({"dense": {"kernel": jnp.ones(2)}}, 0.1)
  tx = sam(optax.sgd(1.0), rho=0.1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(_params(), tx.init(_params()), _params())
