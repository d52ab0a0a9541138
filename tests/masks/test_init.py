"""Mask inits: the scores are what their formulas say, and FISH is the global Fisher top-k."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks import init as init_lib
from sparsejax.masks.distributions import make_mask
from sparsejax.registry import MASK_INITS


# Mask inits a user would add: one registry entry each, declaring what it needs.
@init_lib.register_init("test_needs_params")
def _params_scores(params, key=None):
  del key
  return jax.tree.map(lambda w: -jnp.abs(w), params)


@init_lib.register_init("test_needs_grads", needs="grads")
def _grads_scores(params, key=None, grads=None):
  del key
  return jax.tree.map(lambda w, g: jnp.asarray(g, jnp.float32), params, grads)


@init_lib.register_init("test_needs_sq_grads", needs="sq_grads")
def _sq_grads_scores(params, key=None, sq_grads=None):
  del key
  return jax.tree.map(lambda w, s: -jnp.asarray(s, jnp.float32), params, sq_grads)


def _params():
  rng = np.random.default_rng(0)
  return {"w": rng.normal(size=(5, 3)).astype(np.float32),
          "v": rng.normal(size=(3, 2)).astype(np.float32)}


def test_registered_inits():
  assert {"random", "magnitude", "saliency", "fisher"} <= set(MASK_INITS.names())


def test_magnitude_and_saliency_formulas():
  params = _params()
  grads = jax.tree.map(lambda p: np.full(p.shape, -2.0, np.float32), params)
  np.testing.assert_array_equal(init_lib.magnitude_scores(params)["w"], np.abs(params["w"]))
  np.testing.assert_allclose(init_lib.saliency_scores(params, grads=grads)["v"],
                             np.abs(params["v"] * -2.0))
  with pytest.raises(ValueError, match="needs grads"):
    init_lib.saliency_scores(params)
  with pytest.raises(ValueError, match="must mirror params"):
    init_lib.saliency_scores(params, grads={"w": grads["w"]})


def test_random_scores_are_uniform_reproducible_and_differ_per_leaf():
  params = {"a": np.zeros((64, 64)), "b": np.zeros((64, 64))}
  first = init_lib.random_scores(params, jax.random.key(3))
  again = init_lib.random_scores(params, jax.random.key(3))
  np.testing.assert_array_equal(first["a"], again["a"])
  assert not np.array_equal(first["a"], first["b"])
  assert 0.0 <= float(first["a"].min()) and float(first["a"].max()) < 1.0
  assert abs(float(first["a"].mean()) - 0.5) < 0.02


def test_fish_mask_is_global_top_k_of_accumulated_squared_grads():
  params = _params()
  rng = np.random.default_rng(1)
  batches = [(rng.normal(size=(1, 5)).astype(np.float32), rng.normal(size=(1, 2)).astype(
      np.float32)) for _ in range(4)]

  def grad_fn(p, batch):
    x, y = batch
    return jax.grad(lambda q: jnp.sum((x @ q["w"] @ q["v"] - y) ** 2))(p)

  sq = init_lib.accumulate_sq_grads(grad_fn, params, batches)
  # Hand-derived gradients of ||x W V - y||^2: dW = x^T (2 r V^T), dV = (x W)^T (2 r).
  expect = {"w": np.zeros((5, 3)), "v": np.zeros((3, 2))}
  for x, y in batches:
    r = 2 * (x @ params["w"] @ params["v"] - y)
    expect["w"] += (x.T @ (r @ params["v"].T)) ** 2
    expect["v"] += ((x @ params["w"]).T @ r) ** 2
  for k in expect:
    np.testing.assert_allclose(sq[k], expect[k], rtol=1e-4)
  mask = make_mask(params, 0.3, "global", init="fisher", sq_grads=sq)
  flat = np.concatenate([expect["v"].ravel(), expect["w"].ravel()])  # leaf order: v, w
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:round(0.3 * flat.size)]] = True
  np.testing.assert_array_equal(np.concatenate([np.ravel(mask.flat()["v"]),
                                                np.ravel(mask.flat()["w"])]), keep)


def _linear_batches_and_grad_fn(n):
  """Batches of y = x (W V) regression and grad_fn(params, batch) counting its calls."""
  rng = np.random.default_rng(2)
  batches = [(rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 2)).astype(
      np.float32)) for _ in range(n)]
  calls = []

  def grad_fn(p, batch):
    calls.append(batch)
    x, y = batch
    return jax.grad(lambda q: jnp.sum((x @ q["w"] @ q["v"] - y) ** 2))(p)

  return batches, grad_fn, calls


def _batch_grads(params, batches):
  """Hand-derived gradients of ||x W V - y||^2 per batch: dW = x^T (2 r V^T), dV = (x W)^T 2 r."""
  out = []
  for x, y in batches:
    r = 2 * (x @ params["w"] @ params["v"] - y)
    out.append({"w": x.T @ (r @ params["v"].T), "v": (x @ params["w"]).T @ r})
  return out


def test_init_needs_of_the_registered_inits():
  assert {name: init_lib.init_needs(name) for name in ("random", "magnitude", "saliency",
                                                        "fisher")} == {
      "random": "params", "magnitude": "params", "saliency": "grads", "fisher": "sq_grads"}
  with pytest.raises(ValueError, match="unknown mask init 'snap'; allowed: .*fisher, magnitude"):
    init_lib.init_needs("snap")
  with pytest.raises(ValueError, match="needs='hessian'; allowed: params, grads, sq_grads"):
    init_lib.register_init("test_bad_need", needs="hessian")(_params_scores)


@pytest.mark.parametrize("name, expected_keys", [("test_needs_params", []),
                                                 ("test_needs_grads", ["grads"]),
                                                 ("test_needs_sq_grads", ["sq_grads"])])
def test_a_new_init_gets_exactly_what_it_declares(name, expected_keys):
  params = _params()
  batches, grad_fn, calls = _linear_batches_and_grad_fn(3)
  inputs = init_lib.init_inputs(name, grad_fn, params, batches)
  assert sorted(inputs) == expected_keys
  per_batch = _batch_grads(params, batches)
  for key in ("w", "v"):
    if name == "test_needs_grads":  # the mean batch gradient
      np.testing.assert_allclose(inputs["grads"][key], sum(g[key] for g in per_batch) / 3,
                                 rtol=1e-4, atol=1e-5)
    if name == "test_needs_sq_grads":  # the summed squared batch gradients
      np.testing.assert_allclose(inputs["sq_grads"][key], sum(g[key] ** 2 for g in per_batch),
                                 rtol=1e-4, atol=1e-5)
  assert bool(calls) == bool(expected_keys)  # params alone: no gradient is computed
  mask = make_mask(params, 0.5, init=name, **inputs)
  assert sum(mask.nnz().values()) == round(0.5 * 21)


def test_builtin_inits_get_the_trainers_inputs():
  params = _params()
  batches, grad_fn, _ = _linear_batches_and_grad_fn(2)
  per_batch = _batch_grads(params, batches)
  saliency = init_lib.init_inputs("saliency", grad_fn, params, batches)
  np.testing.assert_allclose(saliency["grads"]["w"], (per_batch[0]["w"] + per_batch[1]["w"]) / 2,
                             rtol=1e-4, atol=1e-5)
  fisher = init_lib.init_inputs("fisher", grad_fn, params, batches)
  np.testing.assert_allclose(fisher["sq_grads"]["v"],
                             per_batch[0]["v"] ** 2 + per_batch[1]["v"] ** 2, rtol=1e-4)
  assert init_lib.init_inputs("magnitude", grad_fn, params, []) == {}
  with pytest.raises(ValueError, match="mask init 'fisher' needs sq_grads .* batches is empty"):
    init_lib.init_inputs("fisher", grad_fn, params, [])
