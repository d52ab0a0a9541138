"""Relevance-selective weight decay (GReg-1): the growing λ and the penalised set, by hand."""
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks.mask import Mask
from sparsejax.masks.relevance import GReg, relevance_decay
from sparsejax.masks.updaters import UpdateInputs

W = np.array([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]], np.float32)
G = np.array([[10.0, 0.01, 1.0], [1.0, 1.0, 1.0]], np.float32)
KW = dict(sparsity=0.5, lam_step=0.5, every=2, lam_max=1.0)


@pytest.mark.parametrize("kind, penalised", [
    ("magnitude", [(0, 0), (0, 2), (1, 1)]),  # |w| = .5, .1, .2 lowest
    ("taylor", [(0, 1), (0, 2), (1, 1)]),     # |w g| = .03, .1, .2 lowest
])
def test_transform_adds_growing_decay_on_the_least_relevant_half(kind, penalised):
  params = {"dense": {"kernel": jnp.asarray(W), "bias": jnp.ones(3)}}
  grads = {"dense": {"kernel": jnp.asarray(G), "bias": jnp.full(3, 0.5)}}
  tx = relevance_decay(**KW, relevance_kind=kind)
  state = tx.init(params)
  selected = np.zeros_like(W)
  for i, j in penalised:
    selected[i, j] = 1.0
  for t, lam in enumerate([0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0]):  # λ_t = min(1, 0.5 ⌊t / 2⌋)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["dense"]["kernel"], G + lam * selected * W, rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], np.full(3, 0.5))  # path rule "kernel"


def test_updater_counts_masked_weights_in_the_penalised_fraction():
  params = {"kernel": jnp.asarray(W)}
  mask = Mask.from_leaves({"kernel": np.array([[0, 1, 1], [1, 1, 1]], bool)},
                          {"kernel": "unstructured"})
  greg = GReg(**KW)
  greg.check(mask)
  got = greg.grads(UpdateInputs(params=params, mask=mask, grads={"kernel": jnp.asarray(G)},
                                state={}, step=4))
  # 3 of 6 penalised: the masked (0, 0) plus the two smallest kept |w| (0.1 and -0.2); λ_4 = 1.
  want = G + np.array([[0, 0, 0.1], [0, -0.2, 0]], np.float32)
  want[0, 0] = 0.0
  np.testing.assert_allclose(got["kernel"], want, rtol=1e-6)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="relevance must be one of"):
    relevance_decay(**KW, relevance_kind="hessian")
  with pytest.raises(ValueError, match="every must be >= 1"):
    GReg(**dict(KW, every=0)).check(Mask.dense_like({"k": jnp.ones(2)}))
