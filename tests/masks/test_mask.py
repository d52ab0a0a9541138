"""The `Mask` pytree: explicit dense leaves, exact density accounting, jit and sharding."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest

from sparsejax.masks import DENSE, Mask, check_mask_matches, leaf_paths, match_rules
from sparsejax.sharding import make_mesh


def _params():
  return {"dense": {"bias": jnp.arange(3.0), "kernel": jnp.ones((2, 3))},
          "out": {"kernel": jnp.full((3, 4), 2.0)}}


def test_dense_like_has_explicit_true_leaves_never_none():
  mask = Mask.dense_like(_params())
  leaves = jax.tree.leaves(mask)
  assert len(leaves) == 3 and all(leaf is not None for leaf in leaves)
  assert all(leaf.dtype == jnp.bool_ and bool(leaf.all()) for leaf in leaves)
  assert mask.structures == (("dense/bias", DENSE), ("dense/kernel", DENSE),
                             ("out/kernel", DENSE))
  assert mask.global_density() == 1.0 and mask.sparse_paths() == []


def test_apply_and_density_hand_worked():
  kernel_mask = np.array([[True, False, False], [False, True, True]])
  leaves = {"dense": {"bias": np.ones(3, bool), "kernel": kernel_mask},
            "out": {"kernel": np.eye(3, 4, dtype=bool)}}
  mask = Mask.from_leaves(leaves, {"dense/kernel": "unstructured", "out/kernel": "unstructured"})
  masked = mask.apply(_params())
  np.testing.assert_array_equal(masked["dense"]["kernel"], [[1, 0, 0], [0, 1, 1]])
  np.testing.assert_array_equal(masked["out"]["kernel"], 2.0 * np.eye(3, 4))
  assert masked["dense"]["kernel"].dtype == jnp.float32
  assert mask.nnz() == {"dense/bias": 3, "dense/kernel": 3, "out/kernel": 3}
  assert mask.density() == {"dense/bias": 1.0, "dense/kernel": 0.5, "out/kernel": 0.25}
  assert mask.global_density() == 6 / 18  # sparse leaves only
  assert mask.global_density(include_dense=True) == 9 / 21


def test_mask_is_a_pytree_through_jit_with_static_structures():
  mask = Mask.from_leaves(jax.tree.map(lambda p: jnp.ones(p.shape, bool), _params()),
                          {"out/kernel": "nm:m=4,n=2"})

  @jax.jit
  def flip(m):
    return m.replace_leaves(jax.tree.map(jnp.logical_not, m.leaves))

  flipped = flip(mask)
  assert flipped.structures == mask.structures
  assert not any(bool(leaf.any()) for leaf in jax.tree.leaves(flipped))


def test_errors_name_the_offending_paths():
  with pytest.raises(ValueError, match="nope"):
    Mask.from_leaves({"a": np.ones(2, bool)}, {"nope": "unstructured"})
  mask = Mask.dense_like({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="'a' has shape"):
    check_mask_matches({"a": jnp.ones(3)}, mask)
  with pytest.raises(ValueError, match="differing paths"):
    check_mask_matches({"b": jnp.ones(2)}, mask)


def test_match_rules_first_match_wins():
  rules = ((r"attn/.*kernel", "nm"), (r"kernel$", "unstructured"))
  assert match_rules("block/attn/q/kernel", rules) == "nm"
  assert match_rules("block/mlp/kernel", rules) == "unstructured"
  assert match_rules("block/mlp/bias", rules, default=DENSE) == DENSE
  assert leaf_paths(_params()) == ["dense/bias", "dense/kernel", "out/kernel"]


def test_mask_leaves_shard_like_their_params():
  mesh = make_mesh(data=2, model=4)
  shardings = {"dense": {"bias": NamedSharding(mesh, P()),
                         "kernel": NamedSharding(mesh, P("data", None))},
               "out": {"kernel": NamedSharding(mesh, P(None, "model"))}}
  params = jax.device_put({"dense": {"bias": jnp.ones(4), "kernel": jnp.ones((4, 4))},
                           "out": {"kernel": jnp.ones((4, 8))}}, shardings)
  mask = Mask.dense_like(params)
  mask = mask.replace_leaves(jax.device_put(mask.leaves, shardings))
  masked = jax.jit(lambda p, m: m.apply(p))(params, mask)
  for leaf, param in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim)
  assert masked["out"]["kernel"].sharding.is_equivalent_to(shardings["out"]["kernel"], 2)
