"""Export: BSR feeds the block-sparse matmul, condensed round trips, sparse checkpoints exact."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from sparsejax.masks import export, structures
from sparsejax.masks.distributions import make_mask
from sparsejax.sharding import make_mesh


def test_bsr_blocks_hand_worked_and_round_trip():
  w = np.arange(16, dtype=np.float32).reshape(4, 4)
  mask = np.zeros((4, 4), bool)
  mask[0:2, 2:4] = mask[2:4, 0:2] = True
  blocks, block_mask = export.to_bsr(w, mask, (2, 2))
  np.testing.assert_array_equal(block_mask, [[False, True], [True, False]])
  np.testing.assert_array_equal(blocks, [[[2, 3], [6, 7]], [[8, 9], [12, 13]]])
  np.testing.assert_array_equal(export.from_bsr(blocks, block_mask), np.where(mask, w, 0))


def test_bsr_export_feeds_block_sparse_matmul_equal_to_masked_dense():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(32, 48)).astype(np.float32)
  mask = np.asarray(structures.select("block", rng.random((32, 48)), 0.25, block=(8, 16)))
  blocks, block_mask = export.to_bsr(w, mask, (8, 16))
  x = rng.normal(size=(5, 32)).astype(np.float32)
  y = block_sparse_matmul(jnp.asarray(x), jnp.asarray(blocks), build_block_schedule(block_mask),
                          implementation="xla")
  np.testing.assert_allclose(y, x @ np.where(mask, w, 0), rtol=1e-5, atol=1e-5)


def test_condensed_round_trip_for_fan_in_and_nm():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(16, 6)).astype(np.float32)
  for name, density, kw, keep in (("fan_in", 0.25, {}, 4), ("nm", None, {"n": 2, "m": 4}, 8)):
    mask = np.asarray(structures.select(name, rng.random((16, 6)), density, **kw))
    values, idx = export.to_condensed(w, mask)
    assert values.shape == (6, keep) and idx.dtype == np.int16
    for o in range(6):  # naive: the kept rows of column o, ascending
      kept = [i for i in range(16) if mask[i, o]]
      np.testing.assert_array_equal(idx[o], kept)
      np.testing.assert_array_equal(values[o], w[kept, o])
    back_w, back_mask = export.from_condensed(values, idx, 16)
    np.testing.assert_array_equal(back_mask, mask)
    np.testing.assert_array_equal(back_w, np.where(mask, w, 0))


def test_export_errors():
  with pytest.raises(ValueError, match="constant fan-in"):
    export.to_condensed(np.ones((4, 2)), np.array([[1, 1], [1, 0], [0, 0], [0, 0]], bool))
  with pytest.raises(ValueError, match="not block-structured"):
    export.to_bsr(np.ones((4, 4)), np.eye(4, dtype=bool), (2, 2))
  with pytest.raises(ValueError, match="must tile"):
    export.to_bsr(np.ones((4, 4)), np.ones((4, 4), bool), (3, 2))


def _model(seed=0, features=256):
  rng = np.random.default_rng(seed)
  return {"dense1": {"bias": rng.normal(size=features).astype(np.float32),
                     "kernel": rng.normal(size=(features, features)).astype(np.float32)},
          "out": {"kernel": rng.normal(size=(features, 16)).astype(np.float32)}}


def test_sparse_checkpoint_restores_bit_identical_params_and_mask(tmp_path):
  params = _model()
  mask = make_mask(params, 0.1, rules=((r"out/", "fan_in"),), key=jax.random.key(0))
  masked = mask.apply(params)
  export.save_sparse(str(tmp_path / "ckpt"), masked, mask)
  restored, restored_mask = export.restore_sparse(str(tmp_path / "ckpt"), target=params)
  assert restored_mask.structures == mask.structures
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(masked)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(want).view(np.uint32))
  for got, want in zip(jax.tree.leaves(restored_mask), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="already exists"):
    export.save_sparse(str(tmp_path / "ckpt"), masked, mask)


def test_sparse_checkpoint_at_90_percent_is_under_a_quarter_of_dense(tmp_path):
  params = _model(features=512)
  mask = make_mask(params, 0.1, key=jax.random.key(1))
  export.save_sparse(str(tmp_path / "sparse"), mask.apply(params), mask)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "dense"), params)
  checkpointer.wait_until_finished()
  sparse_bytes = export.directory_bytes(str(tmp_path / "sparse"))
  dense_bytes = export.directory_bytes(str(tmp_path / "dense"))
  assert sparse_bytes <= 0.25 * dense_bytes, (sparse_bytes, dense_bytes)


def test_sparse_checkpoint_restores_onto_another_mesh(tmp_path):
  params = _model(features=64)
  mask = make_mask(params, 0.25, key=jax.random.key(2))
  mesh8 = make_mesh(data=8)
  put8 = lambda t: jax.device_put(t, NamedSharding(mesh8, P("data")))  # noqa: E731
  saved_params = jax.tree.map(put8, mask.apply(params))
  saved_mask = mask.replace_leaves(jax.tree.map(put8, mask.leaves))
  export.save_sparse(str(tmp_path / "ckpt"), saved_params, saved_mask)

  mesh = make_mesh(data=2, model=4)
  shardings = {"dense1": {"bias": NamedSharding(mesh, P("model")),
                          "kernel": NamedSharding(mesh, P("data", "model"))},
               "out": {"kernel": NamedSharding(mesh, P("model", None))}}
  restored, restored_mask = export.restore_sparse(str(tmp_path / "ckpt"), target=params,
                                                  shardings=shardings)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  for leaf, m, sharding, want in zip(jax.tree.leaves(restored), jax.tree.leaves(restored_mask),
                                     flat_shardings, jax.tree.leaves(mask.apply(params))):
    assert leaf.sharding == sharding and m.sharding == sharding
    np.testing.assert_array_equal(leaf, want)
  assert restored_mask.structures == mask.structures
  np.testing.assert_array_equal(restored_mask.flat()["dense1/kernel"], mask.flat()["dense1/kernel"])


@pytest.mark.parametrize("dtype, bits", [(jnp.bfloat16, np.uint16), (jnp.float16, np.uint16),
                                         (jnp.float32, np.uint32)])
def test_sparse_checkpoint_round_trips_low_precision_bit_identically(tmp_path, dtype, bits):
  rng = np.random.default_rng(3)
  params = {"bias": jnp.asarray(rng.normal(size=8), dtype),
            "kernel": jnp.asarray(rng.normal(size=(16, 8)), dtype).at[0, 0].set(-0.0)}
  mask = make_mask(params, 0.5, key=jax.random.key(4))
  masked = mask.apply(params)
  export.save_sparse(str(tmp_path / "ckpt"), masked, mask)
  restored, restored_mask = export.restore_sparse(str(tmp_path / "ckpt"))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(masked), strict=True):
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got).view(bits), np.asarray(want).view(bits))
  np.testing.assert_array_equal(restored_mask.flat()["kernel"], mask.flat()["kernel"])
