"""DASS: relaxation, chain-rule gradients, density penalty, discretisation, bilevel step, search."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.masks import dass


def test_relaxed_mask_and_chain_grads_hand_worked():
  # S = [0, τ ln 3] -> m̃ = [1/2, 3/4]; g' = [1, 2], W = [2, -1].
  for tau in (1.0, 2.0):
    s = jnp.array([[0.0, tau * math.log(3.0)]])
    np.testing.assert_allclose(dass.relaxed_mask(s, tau), [[0.5, 0.75]], rtol=1e-6)
    gw, gs = dass.chain_grads(jnp.array([[2.0, -1.0]]), s, jnp.array([[1.0, 2.0]]), tau)
    np.testing.assert_allclose(gw, [[0.5, 1.5]], rtol=1e-6)
    # g' W m(1-m) / τ = [1*2*1/4, 2*(-1)*3/16] / τ
    np.testing.assert_allclose(gs, np.array([[0.5, -0.375]]) / tau, rtol=1e-6)


def test_density_penalty_hand_worked():
  # m̃ = [1/2, 1/2] and [3/4]: ρ = 7/12; d = 1/2, λ = 2 -> R = 2 (1/12)^2.
  scores = [jnp.zeros(2), jnp.array([math.log(3.0)])]
  penalty, rho, grads = dass.density_penalty_grads(scores, 0.5, 2.0, 1.0)
  np.testing.assert_allclose(rho, 7 / 12, rtol=1e-6)
  np.testing.assert_allclose(penalty, 2 / 144, rtol=1e-5)
  coef = 2 * 2.0 * (1 / 12) / 3  # 2λ(ρ − d) / N
  np.testing.assert_allclose(grads[0], [coef / 4, coef / 4], rtol=1e-5)
  np.testing.assert_allclose(grads[1], [coef * 3 / 16], rtol=1e-5)


def _scores():
  return {"a": {"kernel": jnp.array([[0.1, 0.9], [0.5, 0.3]]), "bias": jnp.array([5.0, -5.0])},
          "b": {"kernel": jnp.array([[0.7, 0.95], [0.8, 0.6]])}}


def test_discretise_hand_worked():
  glob = dass.discretise(_scores(), 0.5, "global").flat()
  # top 4 of the 8 kernel logits: 0.95, 0.9, 0.8, 0.7; biases stay dense
  np.testing.assert_array_equal(glob["a/kernel"], [[False, True], [False, False]])
  np.testing.assert_array_equal(glob["b/kernel"], [[True, True], [True, False]])
  np.testing.assert_array_equal(glob["a/bias"], [True, True])
  per_leaf = dass.discretise(_scores(), 0.5, "uniform").flat()
  np.testing.assert_array_equal(per_leaf["a/kernel"], [[False, True], [True, False]])
  np.testing.assert_array_equal(per_leaf["b/kernel"], [[False, True], [True, False]])
  ties = dass.discretise({"k": jnp.zeros((2, 2))}, 0.5).flat()["k"]
  np.testing.assert_array_equal(ties, [[True, True], [False, False]])  # lower index wins


@pytest.mark.parametrize("distribution", ["global", "uniform", "erk"])
def test_discretise_hits_density_exactly(distribution):
  rng = np.random.default_rng(0)
  scores = {"l0": {"kernel": jnp.asarray(rng.normal(size=(7, 5))), "bias": jnp.zeros(5)},
            "l1": {"kernel": jnp.asarray(rng.normal(size=(5, 3)))}}
  # per-leaf distributions keep >= 1 entry per leaf, so start at 2 entries of 50
  for density in (0.04, 0.3, 0.77, 1.0):
    mask = dass.discretise(scores, density, distribution)
    kept = sum(mask.nnz()[p] for p in mask.sparse_paths())
    assert kept == round(density * 50), (density, kept)
    assert mask.sparse_paths() == ["l0/kernel", "l1/kernel"]


def test_discretise_rejects_bad_arguments():
  with pytest.raises(ValueError, match="distribution='topk'"):
    dass.discretise(_scores(), 0.5, "topk")
  with pytest.raises(ValueError, match="density must be in"):
    dass.discretise(_scores(), 0.0)
  with pytest.raises(ValueError, match="unstructured"):
    dass.discretise(_scores(), 0.5, rules=((r"kernel", "nm:n=2,m=4"),))


def _quadratic_loss(params, batch):
  return jnp.mean((batch["x"] @ params["w"]["kernel"] + params["w"]["bias"] - batch["y"]) ** 2)


def test_dass_step_is_first_order_bilevel():
  """With SGD(lr=1) and λ = 0: S' = S − ∇_S L_val(W ⊙ σ(S/τ)), W' = W − ∇_W L_train(W ⊙ σ(S'/τ)),
  the gradients taken by autodiff of the composite loss."""
  rng = np.random.default_rng(1)
  params = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=2), jnp.float32)}}
  scores = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  batch = lambda: {"x": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                   "y": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  train, val = batch(), batch()
  tau = 0.5
  sgd = optax.sgd(1.0)
  state = dass.DassState(params=params, scores=scores, weight_opt=sgd.init(params),
                         score_opt=sgd.init(scores), step=jnp.zeros((), jnp.int32))
  sparse = dass.sparse_flags(params)
  new, metrics = jax.jit(lambda st, t, v: dass.dass_step(jax.grad(_quadratic_loss), st, t, v,
                                                         sparse, sgd, sgd, 0.5, 0.0, tau))(
                                                             state, train, val)

  def composite(w, s, b):
    relaxed = {"w": {"kernel": w["w"]["kernel"] * jax.nn.sigmoid(s / tau),
                     "bias": w["w"]["bias"]}}
    return _quadratic_loss(relaxed, b)

  @jax.jit
  def reference():
    s_ref = scores["w"]["kernel"] - jax.grad(composite, 1)(params, scores["w"]["kernel"], val)
    return s_ref, jax.grad(composite)(params, s_ref, train)

  s_ref, w_grad = reference()
  np.testing.assert_allclose(new.scores["w"]["kernel"], s_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new.scores["w"]["bias"], scores["w"]["bias"])  # dense: unused
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(new.params["w"][name], params["w"][name] - w_grad["w"][name],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["relaxed_density"],
                             np.mean(1 / (1 + np.exp(-np.asarray(scores["w"]["kernel"]) / tau))),
                             rtol=1e-5)


def test_dass_search_finds_the_support_of_a_sparse_regression():
  rng = np.random.default_rng(2)
  w_true = np.zeros((6, 2), np.float32)
  w_true[[0, 3, 5], [1, 0, 1]] = [2.0, -1.5, 1.0]

  def batches(n):
    out = []
    for _ in range(n):
      x = rng.normal(size=(32, 6)).astype(np.float32)
      out.append({"x": jnp.asarray(x), "y": jnp.asarray(x @ w_true)})
    return out

  params = {"w": {"kernel": jnp.asarray(0.1 * rng.normal(size=(6, 2)), jnp.float32),
                  "bias": jnp.zeros(2)}}
  result = dass.dass_search(jax.grad(_quadratic_loss), params, batches(150), batches(150),
                            density=0.25, weight_tx=optax.adam(3e-2),
                            score_tx=optax.adam(1e-1))
  np.testing.assert_array_equal(result.mask.flat()["w/kernel"], w_true != 0)
  assert result.mask.sparse_paths() == ["w/kernel"]
