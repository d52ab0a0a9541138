"""scikit-learn's bundled 8x8 handwritten digits as a classification dataset (no download).

1797 grey-scale images of the digits 0-9, 8x8 pixels with values 0..16, shipped inside
scikit-learn (`sklearn.datasets.load_digits`). Inputs are the 64 pixels scaled to [0, 1]
(x / 16), labels the digit.

Split: a fixed, seeded, stratified hold-out. For each class c with n_c images (in stored order),
`np.random.default_rng([SPLIT_SEED, c]).permutation(n_c)` orders them and the first
round(TEST_FRACTION * n_c) go to "test", the rest to "train"; each split keeps stored order.
That gives 1438 train and 359 test images, identical on every machine.

A split is an `ArrayDataset`, a random-access source for `experiments.data.loader`: `ds[i]` is
the example {"inputs": float32 [64], "targets": int32 [], "weights": float32 [] = 1}. Batches
have the trainer's shape: {"inputs": float32 [B, 64], "targets": int32 [B], "weights":
float32 [B]} (weight 0 marks padding).
"""
import dataclasses
import functools

import numpy as np


NAME = "digits"
NUM_CLASSES = 10
NUM_FEATURES = 64
SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MAX_PIXEL = 16.0


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """An in-memory classification split: inputs float32 [N, D], labels int32 [N].

  A random-access source of examples: `len(ds)` is N and `ds[i]` example i's
  {"inputs": float32 [D], "targets": int32 [], "weights": float32 [] = 1.0}.
  `name` and `split` (e.g. "digits", "train") are for `summary`.
  """

  inputs: np.ndarray
  labels: np.ndarray
  name: str = ""
  split: str = ""

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"inputs": self.inputs[i], "targets": np.asarray(self.labels[i], np.int32),
            "weights": np.ones((), np.float32)}

  def summary(self) -> str:
    """One line for a start-up banner: name[split], examples, features."""
    return (f"{self.name}[{self.split}]: {self.num_examples:,} examples of"
            f" {self.inputs.shape[1]} features")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (slow import; only here)

  bunch = datasets.load_digits()
  return bunch.data.astype(np.float32), bunch.target.astype(np.int32)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """Indices (ascending) of `split` in the stratified hold-out described in the module docstring."""
  if split not in SPLITS:
    raise ValueError(f"digits split={split!r} does not exist; allowed: {', '.join(SPLITS)}")
  chosen = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    order = np.random.default_rng([SPLIT_SEED, c]).permutation(len(members))
    num_test = int(round(TEST_FRACTION * len(members)))
    picked = order[:num_test] if split == "test" else order[num_test:]
    chosen.append(members[picked])
  return np.sort(np.concatenate(chosen))


def load_digits(split: str) -> ArrayDataset:
  """The "train" or "test" split: inputs x / 16 in [0, 1], float32 [N, 64]; labels int32 [N]."""
  images, labels = _raw()
  idx = split_indices(labels, split)
  return ArrayDataset(images[idx] / MAX_PIXEL, labels[idx], name=NAME, split=split)


def _batch(ds: ArrayDataset, indices: np.ndarray, num_real: int) -> dict[str, np.ndarray]:
  weights = (np.arange(len(indices)) < num_real).astype(np.float32)
  return {"inputs": ds.inputs[indices], "targets": ds.labels[indices], "weights": weights}


def eval_batches(ds: ArrayDataset, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every example once, in order, in ceil(N / B) batches of B; the last is padded with
  copies of example 0 at weight 0."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
  batches = []
  for start in range(0, ds.num_examples, batch_size):
    real = np.arange(start, min(start + batch_size, ds.num_examples))
    indices = np.concatenate([real, np.zeros(batch_size - len(real), np.int64)])
    batches.append(_batch(ds, indices, len(real)))
  return batches
