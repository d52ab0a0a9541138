"""Activation patching against a NumPy re-implementation of a small two-site model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.activations import patching
from sparsejax.sites import Site

V, D = 5, 3


class TwoSites(nn.Module):
  """logits = tanh(cumsum_t(E[tokens]) W1) W2 with sites "mix" (before tanh) and "hidden"."""

  @nn.compact
  def __call__(self, tokens_BT):
    init = nn.initializers.normal(1.0)
    embed, w1, w2 = (self.param(n, init, s) for n, s in (("embed", (V, D)), ("w1", (D, D)),
                                                          ("w2", (D, V))))
    mix_BTD = Site(name="mix")(jnp.cumsum(embed[tokens_BT], 1) @ w1)
    return Site(name="hidden")(jnp.tanh(mix_BTD)) @ w2


def numpy_forward(p, tokens_BT, site=None, source_BTD=None, mask_BTD=None):
  """The model in NumPy float64, with site `site` overwritten by source where mask."""
  mix = np.cumsum(p["embed"][tokens_BT], 1) @ p["w1"]
  if site == "mix":
    mix = np.where(mask_BTD, source_BTD, mix)
  hidden = np.tanh(mix)
  if site == "hidden":
    hidden = np.where(mask_BTD, source_BTD, hidden)
  return hidden @ p["w2"], {"mix": mix, "hidden": hidden}


@pytest.fixture(scope="module")
def setup():
  model = TwoSites()
  clean_BT = np.array([[0, 1, 2, 3], [4, 3, 2, 1]])
  corrupt_BT = np.array([[0, 4, 2, 3], [4, 3, 0, 1]])
  variables = jax.jit(model.init)(jax.random.key(0), clean_BT)
  p = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
  return model, variables, p, clean_BT, corrupt_BT


def test_patching_everything_gives_clean_and_nothing_gives_corrupt(setup):
  model, variables, p, clean_BT, corrupt_BT = setup
  clean, _ = numpy_forward(p, clean_BT)
  corrupt, _ = numpy_forward(p, corrupt_BT)
  run = jax.jit(lambda site, positions: patching.patch(model, variables, clean_BT, corrupt_BT,
                                                       site, positions=positions),
                static_argnums=0)
  for site in ("mix", "hidden"):
    np.testing.assert_allclose(run(site, None), clean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run("hidden", jnp.zeros(0, jnp.int32)), corrupt, rtol=1e-5,
                             atol=1e-5)


def test_one_position_and_neurons_match_numpy(setup):
  model, variables, p, clean_BT, corrupt_BT = setup
  _, clean_sites = numpy_forward(p, clean_BT)
  _, corrupt_sites = numpy_forward(p, corrupt_BT)
  mask_BTD = np.zeros((2, 4, D), bool)
  mask_BTD[:, 1, [0, 2]] = True
  want, _ = numpy_forward(p, corrupt_BT, "mix", clean_sites["mix"], mask_BTD)
  run = jax.jit(lambda site, into, positions, neurons: patching.patch(
      model, variables, clean_BT, corrupt_BT, site, positions=positions, neurons=neurons,
      into=into), static_argnums=(0, 1))
  got = run("mix", "corrupt", jnp.array([1]), jnp.array([0, 2]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  mask_BTD = np.zeros((2, 4, D), bool)
  mask_BTD[:, 2] = True
  want, _ = numpy_forward(p, clean_BT, "hidden", corrupt_sites["hidden"], mask_BTD)
  got = run("hidden", "clean", jnp.array([2]), None)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="into='both'"):
    patching.patch(model, variables, clean_BT, corrupt_BT, "mix", into="both")


def test_sweep_table_matches_numpy_per_site_and_position(setup):
  model, variables, p, clean_BT, corrupt_BT = setup
  correct, wrong = np.array([1, 2]), np.array([0, 0])
  out = patching.patching_sweep(model, variables, clean_BT, corrupt_BT, ["mix", "hidden"],
                                patching.logit_diff_metric(correct, wrong))
  diff = lambda logits: np.mean(logits[[0, 1], -1, correct] - logits[[0, 1], -1, wrong])
  _, clean_sites = numpy_forward(p, clean_BT)
  assert out["sites"] == ["mix", "hidden"]
  np.testing.assert_array_equal(out["positions"], np.arange(4))
  want_SP = np.zeros((2, 4))
  for s, site in enumerate(out["sites"]):
    for t in range(4):
      mask_BTD = np.zeros((2, 4, D), bool)
      mask_BTD[:, t] = True
      want_SP[s, t] = diff(numpy_forward(p, corrupt_BT, site, clean_sites[site], mask_BTD)[0])
  np.testing.assert_allclose(out["table_SP"], want_SP, rtol=1e-4, atol=1e-5)
  assert float(out["clean"]) == pytest.approx(diff(numpy_forward(p, clean_BT)[0]), rel=1e-4)
  assert float(out["corrupt"]) == pytest.approx(diff(numpy_forward(p, corrupt_BT)[0]), rel=1e-4)
  # Only the last position's own value matters at "hidden"; at "mix" too (no later mixing).
  np.testing.assert_allclose(out["table_SP"][:, :3], float(out["corrupt"]), rtol=1e-4)


def test_cross_entropy_metric_by_hand():
  logits_BTV = jnp.array([[[0.0, 0.0], [2.0, 0.0]]])
  targets_BT, weights_BT = np.array([[1, 0]]), np.array([[1.0, 0.0]])
  weighted, unweighted = jax.jit(lambda logits: (
      patching.cross_entropy_metric(targets_BT, weights_BT)((logits, {})),
      patching.cross_entropy_metric(targets_BT)(logits)))(logits_BTV)
  assert float(weighted) == pytest.approx(np.log(2.0))
  both = np.log(2.0) + np.log(1 + np.exp(-2.0))
  assert float(unweighted) == pytest.approx(both / 2)
