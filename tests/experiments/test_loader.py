"""The Grain training loader against a reference order built here from Grain's plain shuffle,
and for real in two JAX processes (tests/experiments/multihost.py)."""
import json

import grain
import jax
import numpy as np
import pytest

from experiments.data import loader
from tests.experiments import multihost

# Grain's index shuffle costs about 40 ms / n per index for small n; this keeps it cheap.
NUM_EXAMPLES = 4096


class RecordingSource:
  """Example i is {"inputs": float32 (i, 1), "targets": int32 i, "weights": float32 1}; every
  index read is appended to `reads`."""

  def __init__(self, num_examples: int = NUM_EXAMPLES):
    self.num_examples = num_examples
    self.reads = []

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    self.reads.append(i)
    return {"inputs": np.array([i, 1], np.float32), "targets": np.asarray(i, np.int32),
            "weights": np.ones((), np.float32)}


def reference_epoch(num_examples: int, seed: int, epoch: int) -> list[int]:
  """Epoch `epoch` of the order in the loader's docstring, from Grain's non-repeated shuffle."""
  grain_seed = (seed * 0x9E3779B9 + epoch) % 2**32
  shuffled = grain.MapDataset.range(num_examples).shuffle(seed=grain_seed)
  return [shuffled[i] for i in range(num_examples)]


def reference_indices(seed: int, positions) -> np.ndarray:
  """Source indices at global `positions` (of NUM_EXAMPLES examples), from `reference_epoch`."""
  epochs = {e: reference_epoch(NUM_EXAMPLES, seed, e)
            for e in {p // NUM_EXAMPLES for p in positions}}
  return np.array([epochs[p // NUM_EXAMPLES][p % NUM_EXAMPLES] for p in positions])


def iterator(source=None, *, batch_size=8, seed=3, rows=None, prefetch=0):
  return loader.make_train_iterator(
      RecordingSource() if source is None else source, global_batch_size=batch_size, seed=seed,
      rows=np.arange(batch_size) if rows is None else rows, prefetch=prefetch)


def at(it: loader.TrainIterator, position: int) -> loader.TrainIterator:
  it.set_state({**it.get_state(), "position": position})
  return it


def take(it, num_batches: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(num_batches)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# The global order.


def test_global_order_is_a_new_grain_shuffle_each_epoch():
  n = 1000
  order = loader.global_order(n, seed=7)
  epochs = [[order[e * n + i] for i in range(n)] for e in range(3)]
  for e, epoch in enumerate(epochs):
    assert sorted(epoch) == list(range(n))
    assert epoch == reference_epoch(n, 7, e)
  assert epochs[0] != epochs[1] != epochs[2]
  # Nearby seeds share no epoch (Grain alone would give seed 8 epoch 0 = seed 7 epoch 1).
  assert [loader.global_order(n, seed=8)[i] for i in range(n)] not in epochs


# Batches, rows and reads.


def test_batches_follow_the_global_order_across_an_epoch():
  source = RecordingSource()
  start = NUM_EXAMPLES - 12  # the second batch crosses into epoch 1
  batches = take(at(iterator(source), start), 3)
  expected = reference_indices(3, range(start, start + 24)).reshape(3, 8)
  for batch, indices in zip(batches, expected):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 2), np.float32), "targets": ((8,), np.int32),
        "weights": ((8,), np.float32)}
    np.testing.assert_array_equal(batch["targets"], indices)
    np.testing.assert_array_equal(batch["inputs"][:, 0], indices)
  assert source.reads == expected.reshape(-1).tolist()


def test_rows_read_only_their_examples():
  whole = take(iterator(), 4)
  rows = np.array([1, 5, 6])
  source = RecordingSource()
  part = take(iterator(source, rows=rows), 4)
  assert_batches_equal(part, [loader.take_rows(batch, rows) for batch in whole])
  assert source.reads == np.concatenate([b["targets"][rows] for b in whole]).tolist()


def test_prefetch_does_not_change_the_batches():
  rows = np.array([0, 2, 3])
  source = RecordingSource()
  prefetched = iterator(source, rows=rows, prefetch=3)
  batches = take(prefetched, 6)
  prefetched.close()
  assert_batches_equal(batches, take(iterator(rows=rows), 6))
  # Reading ahead reads only these rows too, of the next `prefetch` batches at most.
  ahead = take(iterator(rows=rows), 6 + 3)
  assert set(source.reads) <= set(np.concatenate([b["targets"] for b in ahead]).tolist())


def test_resume_through_json_continues_exactly():
  it = iterator(prefetch=2)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"position": 24, "seed": 3, "num_examples": NUM_EXAMPLES}
  resumed = iterator(prefetch=2)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), take(it, 3))
  assert resumed.get_state() == it.get_state()


def test_state_is_the_same_for_all_rows_and_restores_on_other_rows_and_batch_sizes():
  whole, first, second = iterator(), iterator(rows=[0, 1, 2, 3]), iterator(rows=[4, 5, 6, 7])
  for it in (whole, first, second):
    take(it, 2)
  assert whole.get_state() == first.get_state() == second.get_state()
  # Two processes' state restores one process, and the other way round.
  one = iterator()
  one.set_state(first.get_state())
  halves = [iterator(rows=[0, 1, 2, 3]), iterator(rows=[4, 5, 6, 7])]
  for half in halves:
    half.set_state(whole.get_state())
  expected = next(whole)
  assert_batches_equal([next(one)], [expected])
  np.testing.assert_array_equal(
      np.concatenate([next(half)["targets"] for half in halves]), expected["targets"])
  # A batch size of 4 continues at the same global position.
  smaller = iterator(batch_size=4)
  smaller.set_state(whole.get_state())
  np.testing.assert_array_equal(np.concatenate([next(smaller)["targets"] for _ in range(2)]),
                                next(whole)["targets"])


def test_take_rows():
  batch = {"inputs": np.arange(12).reshape(6, 2), "targets": np.arange(6)}
  rows = loader.take_rows(batch, np.array([1, 4]))
  np.testing.assert_array_equal(rows["inputs"], [[2, 3], [8, 9]])
  np.testing.assert_array_equal(rows["targets"], [1, 4])


def test_process_rows_on_one_process_is_every_row():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  specs = [(("data",), 8), ((("data", "model"), None), 16), (("data", "model"), 4), ((), 3)]
  for spec, batch_size in specs:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    np.testing.assert_array_equal(loader.process_rows(sharding, batch_size), np.arange(batch_size))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with pytest.raises(ValueError, match="global_batch_size=6 cannot be sharded"):
    loader.process_rows(sharding, 6)


def test_errors():
  with pytest.raises(ValueError, match=r"rows must be .* \[0, global_batch_size=8\), got rows=\[8\]"):
    iterator(rows=[8])
  with pytest.raises(ValueError, match=r"got rows=\[\]"):
    iterator(rows=[])
  with pytest.raises(ValueError, match="global_batch_size=0"):
    iterator(batch_size=0)
  with pytest.raises(ValueError, match="seed=-1"):
    iterator(seed=-1)
  with pytest.raises(ValueError, match="prefetch=-1"):
    iterator(prefetch=-1)
  with pytest.raises(ValueError, match="num_examples=0"):
    iterator(RecordingSource(0))
  it = iterator()
  with pytest.raises(ValueError, match="saved with seed=4, this iterator has seed=3"):
    it.set_state({"position": 0, "seed": 4, "num_examples": NUM_EXAMPLES})
  with pytest.raises(ValueError, match="saved with num_examples=5, .* num_examples=4096"):
    it.set_state({"position": 0, "seed": 3, "num_examples": 5})
  with pytest.raises(ValueError, match=r"keys \['position', 'seed', 'num_examples'\]"):
    it.set_state({"position": 0})
  with pytest.raises(ValueError, match="position=-8"):
    it.set_state({"position": -8, "seed": 3, "num_examples": NUM_EXAMPLES})


# Two real processes.

MULTIHOST_BATCH, MULTIHOST_STEPS, MULTIHOST_SEED = 16, 3, 5

# Each process: its rows of a batch sharded over the 8 devices of both, the batches, what it
# read, a jitted global sum of each batch's inputs, and its data state.
MULTIHOST_CODE = f"""
import json
import numpy as np
from experiments.data import loader
from tests.experiments.test_loader import RecordingSource

mesh = jax.make_mesh((jax.device_count(),), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
rows = loader.process_rows(sharding, {MULTIHOST_BATCH})
source = RecordingSource()
batches = loader.make_train_iterator(source, global_batch_size={MULTIHOST_BATCH},
                                     seed={MULTIHOST_SEED}, rows=rows, prefetch=0)
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
global_sum = jax.jit(lambda x: x.sum(axis=0), out_shardings=replicated)
targets, sums = [], []
for _ in range({MULTIHOST_STEPS}):
  batch = next(batches)
  inputs = jax.make_array_from_process_local_data(
      sharding, batch["inputs"], ({MULTIHOST_BATCH}, batch["inputs"].shape[1]))
  sums.append(np.asarray(global_sum(inputs)).tolist())
  targets.append(batch["targets"].tolist())
batches.close()
print(json.dumps({{"rows": rows.tolist(), "reads": source.reads, "targets": targets,
                  "sums": sums, "state": batches.get_state()}}))
"""


def test_two_processes_read_only_their_rows_and_make_the_global_batch():
  outputs = [json.loads(out) for out in multihost.run_processes(MULTIHOST_CODE, timeout_s=90)]
  single = iterator(batch_size=MULTIHOST_BATCH, seed=MULTIHOST_SEED)
  expected = take(single, MULTIHOST_STEPS)
  half = MULTIHOST_BATCH // 2
  assert [out["rows"] for out in outputs] == [list(range(half)), list(range(half, 2 * half))]
  for step, batch in enumerate(expected):
    np.testing.assert_array_equal(
        np.concatenate([out["targets"][step] for out in outputs]), batch["targets"])
    for out in outputs:
      np.testing.assert_array_equal(out["sums"][step], batch["inputs"].sum(axis=0))
  for out in outputs:  # each read exactly the examples of its rows
    assert out["reads"] == np.concatenate(out["targets"]).tolist()
  assert outputs[0]["state"] == outputs[1]["state"] == single.get_state()
  restored = iterator(batch_size=MULTIHOST_BATCH, seed=MULTIHOST_SEED)
  restored.set_state(outputs[1]["state"])
  assert_batches_equal([next(restored)], [next(single)])


def test_a_failing_process_stops_all_with_its_stderr():
  code = """
  import time
  if jax.process_index() == 1:
    raise ValueError("no data for process 1")
  time.sleep(60)
  """
  with pytest.raises(RuntimeError, match=r"(?s)process 1 of 2 failed.*process 0: exit status -9"
                                         r".*ValueError: no data for process 1"):
    multihost.run_processes(code, timeout_s=50)
