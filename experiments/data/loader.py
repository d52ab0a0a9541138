"""Training batches read through Grain: a seeded global order, each process reading its own rows.

A source is any random-access dataset of examples: `len(source)` and `source[i]`, a dict of
numpy arrays with the same keys, shapes and dtypes for every i (`WindowDataset` and
`digits.ArrayDataset` are sources).

The global order is an infinite sequence of source indices, one Grain index shuffle per epoch:
with n = len(source), global position p reads source index

  order[p] = shuffle(p mod n; n, (g + p // n) mod 2^32),   g = (seed * 0x9E3779B9) mod 2^32,

where shuffle(i; n, s) is Grain's `index_shuffle` permutation of [0, n) with seed s
(`grain.MapDataset.range(n).shuffle(seed=g).repeat()`). Multiplying the seed by the golden-ratio
constant keeps runs with nearby seeds from sharing epochs (Grain reseeds epoch e with g + e).
One index costs about 5 us + 40 ms / n of CPU (Grain walks cycles in a domain of at least 2^16),
so an epoch of a small source costs some 40 ms however small it is.

Global training step s, counted from position p0, is the batch of positions
[p0 + s*B, p0 + (s+1)*B) for the global batch size B. A process holds the rows `process_rows`
of it (those its addressable devices hold when the batch is sharded on its leading axis) and
reads from the source only the examples at those rows. The data state is the global position
of the next batch, the same on every process, so a checkpoint written with one process count,
mesh or batch size restores with another.

Evaluation batches are deterministic global batches (`experiments.data.eval_batches`,
`digits.eval_batches`); `take_rows` gives a process its rows of one.
"""
import functools
import sys
from typing import Any, Mapping, Protocol, Sequence

import grain
import jax
import numpy as np

from experiments.data.pipeline import _check_non_negative
from experiments.data.pipeline import _check_positive

Example = dict[str, np.ndarray]
# Spreads user seeds over Grain's 32-bit seed space (Knuth's multiplicative hash).
_SEED_MULTIPLIER = 0x9E3779B9
_STATE_KEYS = ("position", "seed", "num_examples")


class Source(Protocol):
  """A random-access dataset: `len(source)` examples, `source[i]` a dict of numpy arrays."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, i: int) -> Example:
    ...


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> np.ndarray:
  """Sorted rows of a global batch that this process's devices hold: int64 [R].

  The batch is sharded on its leading axis by `sharding`: a NamedSharding with a PartitionSpec
  of any rank (trailing axes may be sharded too), or any sharding of a rank-1 array. On one
  process this is arange(global_batch_size).
  """
  _check_positive("global_batch_size", global_batch_size)
  rank = len(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else 1
  # Trailing sizes divisible by every mesh axis, so that only the leading axis matters.
  shape = (global_batch_size,) + (len(sharding.device_set),) * (rank - 1)
  try:
    index_map = sharding.addressable_devices_indices_map(shape)
  except ValueError as e:
    raise ValueError(f"global_batch_size={global_batch_size} cannot be sharded by {sharding}: "
                     f"{e}") from None
  rows = np.arange(global_batch_size)
  return np.unique(np.concatenate([rows[index[0]] for index in index_map.values()]))


def take_rows(batch: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  """Rows `rows` of every array of a global batch: {k: v[rows]}."""
  return {key: value[rows] for key, value in batch.items()}


def global_order(num_examples: int, seed: int) -> grain.MapDataset:
  """The source index at each global position: infinite, one Grain shuffle per epoch.

  Element p is order[p] of the module docstring: epoch p // num_examples is a permutation of
  range(num_examples) drawn by Grain's index shuffle, each epoch another.
  """
  _check_positive("num_examples", num_examples)
  _check_non_negative("seed", seed)
  grain_seed = seed * _SEED_MULTIPLIER % 2**32
  return grain.MapDataset.range(num_examples).shuffle(seed=grain_seed).repeat()


def _stack_examples(examples: Sequence[Example]) -> dict[str, np.ndarray]:
  """A batch from examples: each key's arrays stacked on a new leading axis [len(examples), ...]."""
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def _read_rows(source: Source, order: grain.MapDataset, rows: np.ndarray,
               position: int) -> dict[str, np.ndarray]:
  """Rows `rows` of the global batch starting at `position`: source[order[position + r]]."""
  return _stack_examples([source[order[position + int(r)]] for r in rows])


class TrainIterator:
  """This process's rows of each global training batch, read through Grain, resumable.

  `next()` gives rows `rows` (in that order) of the global batch at the current position and
  advances the position by the global batch size B. `prefetch` batches are read ahead in as
  many background threads (Grain's ReadOptions); the batches do not depend on it.

  Attributes:
    global_batch_size: B.
    seed: the seed of the global order.
    rows: the rows of each global batch this iterator returns, int64 [R].
    num_examples: len(source).
  """

  def __init__(self, source: Source, *, global_batch_size: int, seed: int, rows: np.ndarray,
               prefetch: int = 2):
    _check_positive("global_batch_size", global_batch_size)
    _check_non_negative("prefetch", prefetch)
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not rows.size or rows.min() < 0 or rows.max() >= global_batch_size:
      raise ValueError(f"rows must be a non-empty list of rows in [0, global_batch_size="
                       f"{global_batch_size}), got rows={rows.tolist()}")
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.rows = rows
    self.num_examples = len(source)
    self._source = source
    self._order = global_order(self.num_examples, seed)
    self._read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    self._position = 0
    self._batches = self._start(0)

  def _start(self, position: int) -> grain.DatasetIterator:
    """A Grain iterator over this process's batches from global `position` on."""
    read = functools.partial(_read_rows, self._source, self._order, self.rows)
    starts = grain.MapDataset.range(position, sys.maxsize, self.global_batch_size)
    return iter(starts.map(read).to_iter_dataset(self._read_options))

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self._position += self.global_batch_size
    return batch

  def get_state(self) -> dict[str, int]:
    """The data state, identical on every process and JSON-serialisable: the global position of
    the next batch, and the seed and source length it belongs to."""
    return {"position": self._position, "seed": self.seed, "num_examples": self.num_examples}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state` of any process, process count, mesh or batch
    size), given the same seed and source length."""
    if sorted(state) != sorted(_STATE_KEYS):
      raise ValueError(f"a data state has the keys {list(_STATE_KEYS)}, got state={dict(state)}")
    mine = self.get_state()
    for key in ("seed", "num_examples"):
      if state[key] != mine[key]:
        raise ValueError(f"the data state was saved with {key}={state[key]}, this iterator has "
                         f"{key}={mine[key]}; resuming would change the training order")
    _check_non_negative("position", state["position"])
    self._batches.close()
    self._position = int(state["position"])
    self._batches = self._start(self._position)

  def close(self) -> None:
    """Stops the background reading."""
    self._batches.close()


def make_train_iterator(source: Source, *, global_batch_size: int, seed: int, rows: np.ndarray,
                        prefetch: int = 2) -> TrainIterator:
  """This process's training batches: rows `rows` of global batch after global batch.

  Args:
    source: the training split, e.g. a `WindowDataset` or `digits.ArrayDataset`.
    global_batch_size: B, examples per global batch (all processes together).
    seed: seed of the global order, an integer >= 0.
    rows: the rows of each global batch to return, e.g. `process_rows(sharding, B)`.
    prefetch: batches read ahead in background threads; 0 reads each batch in `next()`.

  Returns:
    A `TrainIterator` at position 0; `set_state` moves it to a saved position.
  """
  return TrainIterator(source, global_batch_size=global_batch_size, seed=seed, rows=rows,
                       prefetch=prefetch)
