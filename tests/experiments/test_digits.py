"""The digits split and batches, checked against scikit-learn's raw arrays."""
import numpy as np
import pytest
from sklearn import datasets

from experiments import data
from experiments.data import digits
from experiments.data import loader

RAW = datasets.load_digits()


def rows_of(split):
  """Indices into RAW of each example of `split`, found by matching its pixels and label."""
  lookup = {(RAW.data[i] / 16.0).astype(np.float32).tobytes() + bytes([RAW.target[i]]): i
            for i in range(len(RAW.target))}
  return [lookup[x.tobytes() + bytes([y])] for x, y in zip(split.inputs, split.labels)]


def test_splits_partition_the_data_stratified_and_scaled():
  train, test = digits.load_digits("train"), digits.load_digits("test")
  assert (train.num_examples, test.num_examples) == (1438, 359)
  assert train.inputs.dtype == np.float32 and train.labels.dtype == np.int32
  assert train.inputs.shape == (1438, 64) and 0.0 <= train.inputs.min() <= train.inputs.max() == 1.0
  # The raw set has duplicate images; count rows with multiplicity instead of a set.
  total = np.concatenate([train.inputs, test.inputs])
  assert sorted(map(bytes, total)) == sorted(map(bytes, (RAW.data / 16.0).astype(np.float32)))
  for c in range(10):
    n_c = int(np.sum(RAW.target == c))
    assert np.sum(test.labels == c) == round(0.2 * n_c)
    assert np.sum(train.labels == c) == n_c - round(0.2 * n_c)


def test_split_is_deterministic_and_in_stored_order():
  a, b = digits.load_digits("test"), digits.load_digits("test")
  np.testing.assert_array_equal(a.inputs, b.inputs)
  rows = rows_of(a)
  assert rows == sorted(rows)


def test_split_is_a_random_access_source_of_examples():
  train = digits.load_digits("train")
  assert len(train) == 1438
  assert train.summary() == "digits[train]: 1,438 examples of 64 features"
  example = train[5]
  assert {k: (v.shape, v.dtype) for k, v in example.items()} == {
      "inputs": ((64,), np.float32), "targets": ((), np.int32), "weights": ((), np.float32)}
  np.testing.assert_array_equal(example["inputs"], train.inputs[5])
  assert example["targets"] == train.labels[5] and example["weights"] == 1.0
  batch = next(loader.make_train_iterator(train, global_batch_size=8, seed=0, rows=[6, 7]))
  order = loader.global_order(len(train), 0)
  np.testing.assert_array_equal(batch["targets"], train.labels[[order[6], order[7]]])
  np.testing.assert_array_equal(batch["weights"], [1.0, 1.0])


def test_eval_batches_cover_every_example_once():
  test = digits.load_digits("test")
  batches = digits.eval_batches(test, batch_size=100)
  assert len(batches) == 4 and all(b["inputs"].shape == (100, 64) for b in batches)
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == 359 and np.all(weights[:359] == 1) and np.all(weights[359:] == 0)
  labels = np.concatenate([b["targets"] for b in batches])[:359]
  np.testing.assert_array_equal(labels, test.labels)


def test_errors():
  with pytest.raises(ValueError, match="split='validation' does not exist; allowed: train, test"):
    digits.load_digits("validation")
  train = digits.load_digits("train")
  with pytest.raises(ValueError, match="batch_size"):
    digits.eval_batches(train, 0)
