"""Per-leaf densities: exact global counts, ERK against a bisection reference, all structures."""
import jax
import numpy as np
import pytest

from sparsejax.masks import structures
from sparsejax.masks.distributions import layer_densities, make_mask


def _shapes():
  return {"conv": {"kernel": np.zeros((3, 3, 4, 8))},
          "fc1": {"bias": np.zeros(64), "kernel": np.zeros((200, 64))},
          "fc2": {"kernel": np.zeros((64, 32))},
          "head": {"kernel": np.zeros((32, 10))}}


def _sparse_total(tree, densities):
  """(kept entries, entries) over the non-bias leaves, from per-leaf densities."""
  kept = total = 0
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = "/".join(str(k.key) for k in key_path)
    if not path.endswith("bias"):
      kept += round(densities[path] * leaf.size)
      total += leaf.size
  return kept, total


def _erk_reference(shapes: dict[str, tuple[int, ...]], target: float) -> dict[str, float]:
  """ERK by bisection on eps: sum_l min(1, eps r_l) size_l = target sum_l size_l."""
  sizes = {p: np.prod(s) for p, s in shapes.items()}
  ratios = {p: sum(s) / np.prod(s) for p, s in shapes.items()}
  goal = target * sum(sizes.values())
  lo, hi = 0.0, 1e9
  for _ in range(200):
    eps = (lo + hi) / 2
    kept = sum(min(1.0, eps * ratios[p]) * sizes[p] for p in shapes)
    lo, hi = (eps, hi) if kept < goal else (lo, eps)
  return {p: min(1.0, eps * ratios[p]) for p in shapes}


def test_uniform_gives_every_kernel_the_target_and_biases_one():
  densities = layer_densities(_shapes(), 0.25)
  assert densities == {"conv/kernel": 0.25, "fc1/bias": 1.0, "fc1/kernel": 0.25,
                       "fc2/kernel": 0.25, "head/kernel": 0.25}


@pytest.mark.parametrize("target", [0.02, 0.1, 0.5])
def test_erk_matches_bisection_reference_and_total_is_exact(target):
  tree = _shapes()
  densities = layer_densities(tree, target, "erk")
  kernels = {"conv/kernel": (3, 3, 4, 8), "fc1/kernel": (200, 64), "fc2/kernel": (64, 32),
             "head/kernel": (32, 10)}
  reference = _erk_reference(kernels, target)
  for path, shape in kernels.items():
    # Within one entry of the ideal count (integer rounding of the counts).
    assert abs(densities[path] - reference[path]) * np.prod(shape) <= 1.0 + 1e-6, path
  kept, total = _sparse_total(tree, densities)
  assert kept == round(target * total)


def test_erk_caps_small_layers_at_one_and_still_meets_the_target():
  densities = layer_densities(_shapes(), 0.5, "erk")
  assert densities["head/kernel"] == 1.0 and densities["conv/kernel"] == 1.0
  kept, total = _sparse_total(_shapes(), densities)
  assert kept == round(0.5 * total)


def test_erk_power_zero_is_uniform():
  assert layer_densities(_shapes(), 0.25, "erk", power=0.0) == layer_densities(_shapes(), 0.25)


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_realised_density_per_leaf_and_global_for_all_structures(distribution):
  params = {"a": {"kernel": np.zeros((16, 12))}, "b": {"kernel": np.zeros((8, 16))},
            "c": {"kernel": np.zeros((12, 20))}, "d": {"kernel": np.zeros((4, 5, 6))},
            "e": {"kernel": np.zeros((40, 24))}, "f": {"bias": np.zeros(7)}}
  rules = ((r"^a/", {"structure": "block", "block": (4, 4)}),
           (r"^b/", {"structure": "nm", "n": 1, "m": 4}),
           (r"^c/", "fan_in"), (r"^d/", {"structure": "channel"}))
  target = 0.3
  densities = layer_densities(params, target, distribution, rules=rules)
  mask = make_mask(params, target, distribution, rules, key=jax.random.key(0))
  sizes = mask.sizes()
  for path, density in mask.density().items():
    assert density == densities[path], path
  assert mask.density()["b/kernel"] == 0.25 and mask.density()["f/bias"] == 1.0
  kept = sum(mask.nnz()[p] for p in mask.sparse_paths())
  assert kept == round(target * sum(sizes[p] for p in mask.sparse_paths()))
  assert mask.global_density() == kept / sum(sizes[p] for p in mask.sparse_paths())
  # Each leaf really has its structure.
  a = np.asarray(mask.flat()["a/kernel"]).reshape(4, 4, 3, 4)
  assert np.all(a.all(axis=(1, 3)) == a.any(axis=(1, 3)))
  c = np.asarray(mask.flat()["c/kernel"])
  assert len(set(c.sum(axis=0))) == 1
  d = np.asarray(mask.flat()["d/kernel"])
  assert np.all(d.all(axis=(0, 1)) == d.any(axis=(0, 1)))
  assert dict(mask.structures)["a/kernel"] == "block:block=4x4"
  assert structures.parse_structure(dict(mask.structures)["b/kernel"]) == ("nm", {"m": 4, "n": 1})


def test_overrides_are_kept_and_the_rest_absorbs_the_difference():
  densities = layer_densities(_shapes(), 0.2, overrides={"head": 1.0, r"^conv/": 0.5})
  assert densities["head/kernel"] == 1.0 and densities["conv/kernel"] == 0.5
  kept, total = _sparse_total(_shapes(), densities)
  assert kept == round(0.2 * total)
  assert densities["fc1/kernel"] == pytest.approx(densities["fc2/kernel"], abs=1 / 2048)


def test_global_magnitude_is_one_threshold_over_all_leaves():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.normal(size=(10, 6))}, "b": {"kernel": 3 * rng.normal(size=(6, 4))},
            "b2": {"bias": rng.normal(size=4)}}
  mask = make_mask(params, 0.25, "global", init="magnitude")
  flat = np.concatenate([np.abs(params["a"]["kernel"]).ravel(),
                         np.abs(params["b"]["kernel"]).ravel()])
  threshold = np.sort(flat)[::-1][round(0.25 * flat.size) - 1]
  np.testing.assert_array_equal(mask.flat()["a/kernel"], np.abs(params["a"]["kernel"]) >= threshold)
  np.testing.assert_array_equal(mask.flat()["b/kernel"], np.abs(params["b"]["kernel"]) >= threshold)
  assert bool(np.asarray(mask.flat()["b2/bias"]).all())


def test_fixed_patterns_in_make_mask():
  params = {"w": {"kernel": np.zeros((8, 8))}, "v": {"kernel": np.zeros((8, 8))}}
  mask = make_mask(params, 0.5, rules=((r"^w/", "butterfly"),), key=jax.random.key(1))
  np.testing.assert_array_equal(mask.flat()["w/kernel"], structures.pattern("butterfly", (8, 8),
                                                                             0.5))
  assert sum(mask.nnz().values()) == 64  # butterfly keeps 24, v absorbs 40


@pytest.mark.parametrize("call, match", [
    (lambda: layer_densities(_shapes(), 0.0), "target density must be in"),
    (lambda: layer_densities(_shapes(), 1.5), "target density must be in"),
    (lambda: layer_densities(_shapes(), 0.5, "zipf"), "unknown sparsity distribution 'zipf'"),
    (lambda: layer_densities(_shapes(), 0.01, overrides={"fc1": 1.0}), "leaving"),
    (lambda: layer_densities(_shapes(), 0.5, "global"), "needs scores"),
    (lambda: make_mask(_shapes(), 0.5), "needs key"),
])
def test_bad_input_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
