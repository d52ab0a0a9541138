"""Mask inits: the scores are what their formulas say, and FISH is the global Fisher top-k."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks import init as init_lib
from sparsejax.masks.distributions import make_mask
from sparsejax.registry import MASK_INITS


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
