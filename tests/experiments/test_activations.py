"""Tests for experiments.data.activations: array_record round trips, the source interface."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.data import activations
from experiments.data import loader


def special_rows() -> np.ndarray:
  """float32 [5, 3] rows with signed zeros, infinities, NaN, a subnormal and extremes."""
  tiny = np.finfo(np.float32).smallest_subnormal
  big = np.finfo(np.float32).max
  return np.asarray([[0.0, -0.0, 1.0], [np.inf, -np.inf, np.nan], [tiny, -tiny, big],
                     [1 / 3, -2.5, 7e-39], [np.pi, np.e, -1e-30]], np.float32)


def test_round_trip_is_bit_exact(tmp_path):
  path = tmp_path / "acts.array_record"
  first = special_rows()
  second = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  third = jnp.asarray([[1.5, -2.0, 0.25]], jnp.bfloat16)  # bfloat16 -> float32 is exact
  want = np.concatenate([first, second, np.asarray(third, np.float32)])
  assert activations.write_activations(path, iter([first, second, third])) == len(want)
  ds = activations.ActivationDataset(path)
  assert len(ds) == len(want)
  rows = np.stack([ds[i]["inputs"] for i in range(len(ds))])
  assert rows.dtype == np.float32 and ds[0]["inputs"].shape == (3,)
  np.testing.assert_array_equal(rows.view(np.uint32), want.view(np.uint32))
  np.testing.assert_array_equal(ds.array().view(np.uint32), want.view(np.uint32))
  assert set(ds[0]) == {"inputs"}
  assert ds.summary() == f"{path}: 10 activation rows of 3 features"
  assert os.listdir(tmp_path) == ["acts.array_record"]


def test_targets_pair_with_inputs_row_by_row(tmp_path):
  rng = np.random.default_rng(1)
  x_TD, y_TD = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
  activations.write_activations(tmp_path / "x", [x_TD])
  activations.write_activations(tmp_path / "y", [y_TD[:2], y_TD[2:]])
  ds = activations.ActivationDataset(tmp_path / "x", targets_path=tmp_path / "y")
  for i in range(6):
    np.testing.assert_array_equal(ds[i]["inputs"], x_TD[i].astype(np.float32))
    np.testing.assert_array_equal(ds[i]["targets"], y_TD[i].astype(np.float32))
  assert ds.summary().endswith(": 6 activation rows of 4 features -> 2 target features")


def test_array_activations_has_the_same_interface():
  rng = np.random.default_rng(2)
  x_TD, y_TD = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
  ds = activations.ArrayActivations(x_TD, y_TD)
  assert len(ds) == 5
  assert ds[4]["inputs"].dtype == np.float32
  np.testing.assert_array_equal(ds[4]["inputs"], x_TD[4].astype(np.float32))
  np.testing.assert_array_equal(ds[4]["targets"], y_TD[4].astype(np.float32))
  np.testing.assert_array_equal(ds.array(), x_TD.astype(np.float32))
  assert ds.summary() == "in memory: 5 activation rows of 3 features -> 2 target features"
  assert set(activations.ArrayActivations(x_TD)[0]) == {"inputs"}


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_loader_reads_every_row_once_per_epoch(tmp_path, in_memory):
  x_TD = np.arange(24, dtype=np.float32).reshape(8, 3)
  if in_memory:
    ds = activations.ArrayActivations(x_TD)
  else:
    activations.write_activations(tmp_path / "acts", [x_TD])
    ds = activations.ActivationDataset(tmp_path / "acts")
  batches = loader.make_train_iterator(ds, global_batch_size=4, seed=0, rows=np.arange(4),
                                       prefetch=0)
  epoch = np.concatenate([next(batches)["inputs"] for _ in range(2)])
  batches.close()
  np.testing.assert_array_equal(epoch[np.argsort(epoch[:, 0])], x_TD)


def test_bad_streams_are_errors_and_leave_no_file(tmp_path):
  path = tmp_path / "acts"
  with pytest.raises(ValueError, match=r"one width D >= 1 \(here 3\), got shape \(2, 4\)"):
    activations.write_activations(path, [np.ones((2, 3)), np.ones((2, 4))])
  with pytest.raises(ValueError, match=r"got shape \(3,\)"):
    activations.write_activations(path, [np.ones(3)])
  assert os.listdir(tmp_path) == []


def test_bad_sources_are_errors(tmp_path):
  with pytest.raises(ValueError, match="path=.*missing' is not a file"):
    activations.ActivationDataset(tmp_path / "missing")
  activations.write_activations(tmp_path / "empty", [])
  with pytest.raises(ValueError, match="holds no activation rows"):
    activations.ActivationDataset(tmp_path / "empty")
  activations.write_activations(tmp_path / "x", [np.ones((3, 2))])
  activations.write_activations(tmp_path / "y", [np.ones((2, 2))])
  with pytest.raises(ValueError, match="holds 2 rows, path=.* 3; they must pair up"):
    activations.ActivationDataset(tmp_path / "x", targets_path=tmp_path / "y")
  with pytest.raises(IndexError, match=r"row index i=3 is outside \[0, 3\)"):
    activations.ActivationDataset(tmp_path / "x")[3]
  with pytest.raises(ValueError, match="targets_TD has 2 rows and array_TD 3"):
    activations.ArrayActivations(np.ones((3, 2)), np.ones((2, 2)))
  with pytest.raises(ValueError, match=r"array_TD must be a non-empty \[T, D\] array"):
    activations.ArrayActivations(np.ones((0, 2)))
