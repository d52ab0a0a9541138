"""Tests of the data pipeline against naive references built here from files and records."""
import hashlib
import pathlib
import platform
import sysconfig

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data
from experiments.data import loader
from experiments.data import pipeline
from experiments.data import stdlib_corpus

PAD, EOS = data.PAD_ID, data.EOS_ID
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


def reference_paths() -> set[str]:
  """Corpus paths by a pathlib walk: *.py outside test dirs, idlelib/idle_test, site-packages."""
  paths = set()
  for top in STDLIB.iterdir():
    if top.name == "site-packages":
      continue
    for path in [top] if top.is_file() else top.rglob("*.py"):
      relative = path.relative_to(STDLIB)
      dirs = relative.parts[:-1]
      if path.suffix != ".py" or {"test", "tests", "site-packages"} & set(dirs):
        continue
      if dirs[:2] == ("idlelib", "idle_test"):
        continue
      paths.add(relative.as_posix())
  return paths


def reference_split(path: str) -> str:
  first_64_bits = int(hashlib.sha256(path.encode()).hexdigest()[:16], 16)
  return "validation" if first_64_bits % 1000 < 50 else "train"


def reference_stream(texts) -> np.ndarray:
  """The split as one token stream: each text's UTF-8 bytes then EOS."""
  tokens = []
  for text in texts:
    tokens.extend(text.encode() if isinstance(text, str) else text)
    tokens.append(EOS)
  return np.array(tokens, np.int64)


def unwindow(ds: data.WindowDataset) -> np.ndarray:
  """Windows concatenated, each but the last without its last (overlapping) token."""
  windows = [ds.window(i) for i in range(ds.num_windows)]
  return np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  stdlib_corpus.PythonStdlib(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture(scope="module")
def stdlib_records(stdlib_dir) -> dict[str, list[dict]]:
  sources = stdlib_corpus.PythonStdlib(data_dir=stdlib_dir).as_data_source()
  return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


# The embedded corpus.


def test_corpus_paths_are_the_stdlib_files(stdlib_records):
  paths = {s: [r["path"].decode() for r in records] for s, records in stdlib_records.items()}
  assert sorted(paths) == ["train", "validation"]
  assert set(paths["train"]) | set(paths["validation"]) == reference_paths()
  assert not set(paths["train"]) & set(paths["validation"])
  assert all(p == sorted(p) for p in paths.values())


def test_corpus_split_follows_path_hash(stdlib_records):
  for split, records in stdlib_records.items():
    assert {reference_split(r["path"].decode()) for r in records} == {split}
  num_validation = len(stdlib_records["validation"])
  assert 0.02 < num_validation / (num_validation + len(stdlib_records["train"])) < 0.1


def test_corpus_stores_file_bytes_exactly(stdlib_records):
  records = stdlib_records["train"] + stdlib_records["validation"]
  for record in records:
    assert record["text"] == (STDLIB / record["path"].decode()).read_bytes()
  assert any(max(r["text"], default=0) > 127 for r in records)  # non-ASCII files included


def test_preparing_the_corpus_prints_our_line_not_tfds_download(tmp_path, capfd):
  data.load_windows("python_stdlib", "validation", 8, data_dir=str(tmp_path))
  out = capfd.readouterr().out
  assert "Downloading and preparing" not in out and "downloaded and prepared" not in out
  version = platform.python_version()
  assert (f"preparing the embedded corpus python_stdlib ({len(reference_paths())} files of Python"
          f" {version}) ...\n") in out
  assert f"prepared python_stdlib in {tmp_path}/python_stdlib/" in out
  data.load_windows("python_stdlib", "validation", 8, data_dir=str(tmp_path))
  assert "python_stdlib" not in capfd.readouterr().out  # prepared once


def test_corpus_records_python_version(stdlib_dir):
  builder = stdlib_corpus.PythonStdlib(data_dir=stdlib_dir)
  assert builder.is_prepared()
  assert builder.info.metadata["python_version"] == platform.python_version()
  assert stdlib_corpus.config_name(platform.python_version()) in builder.data_path.parts
  assert stdlib_corpus.config_name("3.12.0") != stdlib_corpus.config_name("3.11.0")


# Windows and batches.


@pytest.mark.parametrize("seq_len", [128, 1000])
def test_windows_reproduce_the_naive_stream(stdlib_dir, seq_len):
  validation = sorted(p for p in reference_paths() if reference_split(p) == "validation")
  stream = reference_stream((STDLIB / p).read_bytes() for p in validation)
  ds = data.load_windows("python_stdlib", "validation", seq_len, data_dir=stdlib_dir)
  assert ds.num_tokens == len(stream)
  assert ds.num_windows == -(-(len(stream) - 1) // seq_len)
  tokens = unwindow(ds)
  np.testing.assert_array_equal(tokens[: len(stream)], stream)
  assert len(tokens) == ds.num_windows * seq_len + 1
  assert np.all(tokens[len(stream) :] == PAD)
  assert ds.metadata["python_version"] == platform.python_version()


def test_on_demand_windows_equal_in_memory_windows(stdlib_dir, tmp_path):
  source = stdlib_corpus.PythonStdlib(data_dir=stdlib_dir).as_data_source(split="validation")
  reads = []

  class CountingSource:
    def __len__(self):
      return len(source)

    def __getitem__(self, k):
      reads.append(k)
      return source[k]

  in_memory = data.WindowDataset(source, 64)
  cache = tmp_path / "offsets.npy"
  on_demand = data.WindowDataset(CountingSource(), 64, in_memory=False, offsets_path=cache)
  assert cache.exists() and len(reads) == len(source)
  reads.clear()
  cached = data.WindowDataset(CountingSource(), 64, in_memory=False, offsets_path=cache)
  assert not reads  # the offsets came from the cache
  assert (cached.num_windows, cached.num_tokens) == (in_memory.num_windows, in_memory.num_tokens)
  for i in range(cached.num_windows):
    np.testing.assert_array_equal(cached.window(i), in_memory.window(i))
  np.testing.assert_array_equal(on_demand.windows([5, 0]), in_memory.windows([5, 0]))
  starts = np.cumsum([0] + [len(source[k]["text"]) + 1 for k in range(len(source))])
  for i in [0, cached.num_windows // 2, cached.num_windows - 1]:
    reads.clear()
    cached.window(i)
    start, stop = 64 * i, 64 * i + 65
    assert reads == [k for k in range(len(source)) if starts[k] < stop and starts[k + 1] > start]


def tiny_dataset(in_memory: bool = True) -> data.WindowDataset:
  """Records b"abc", "hé" (2 UTF-8 bytes) and "" with seq_len 4."""
  records = [{"text": b"abc"}, {"text": "h\u00e9"}, {"text": ""}]
  return data.WindowDataset(records, 4, in_memory=in_memory)


@pytest.mark.parametrize("in_memory", [True, False])
def test_tiny_windows_by_hand(in_memory):
  a, b, c, h = 97, 98, 99, 104
  ds = tiny_dataset(in_memory)
  assert (ds.num_tokens, ds.num_windows) == (9, 2)
  np.testing.assert_array_equal(ds.window(0), [a, b, c, EOS, h])
  np.testing.assert_array_equal(ds.window(1), [h, 0xC3, 0xA9, EOS, EOS])
  ds = data.WindowDataset([{"text": b"abcdef"}], 4, in_memory=in_memory)
  np.testing.assert_array_equal(ds.window(1), [101, 102, EOS, PAD, PAD])
  assert ds.window(1).dtype == np.int32
  with pytest.raises(IndexError, match="num_windows=2"):
    ds.window(2)


def test_train_batch_layout(stdlib_dir):
  ds = data.load_windows("python_stdlib", "validation", 32, data_dir=stdlib_dir)
  order = data.loader.global_order(ds.num_windows, seed=3)
  last_at = next(p for p in range(ds.num_windows) if order[p] == ds.num_windows - 1)
  position = max(last_at - 32, 0)  # a batch holding the padded last window
  batches = data.make_train_iterator(ds, global_batch_size=64, seed=3, rows=np.arange(64))
  batches.set_state({**batches.get_state(), "position": position})
  batch = next(batches)
  indices = [order[position + r] for r in range(64)]
  assert ds.num_windows - 1 in indices
  windows = np.stack([ds.window(i) for i in indices])
  np.testing.assert_array_equal(batch["inputs"], windows[:, :-1])
  np.testing.assert_array_equal(batch["targets"], windows[:, 1:])
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  np.testing.assert_array_equal(batch["weights"], np.where(windows[:, 1:] == PAD, 0.0, 1.0))
  assert 0 < np.sum(batch["weights"] == 0) < 32
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((64, 32), np.int32),
      "targets": ((64, 32), np.int32),
      "weights": ((64, 32), np.float32),
  }


def test_windows_are_a_random_access_source_of_examples(stdlib_dir):
  ds = data.load_windows("python_stdlib", "validation", 32, data_dir=stdlib_dir)
  assert len(ds) == ds.num_windows
  assert ds.summary() == (f"python_stdlib[validation]: {ds.num_windows:,} windows of 32 tokens"
                          f" ({ds.num_tokens:,} tokens)")
  last = ds[ds.num_windows - 1]
  window = ds.window(ds.num_windows - 1)
  assert {k: (v.shape, v.dtype) for k, v in last.items()} == {
      "inputs": ((32,), np.int32), "targets": ((32,), np.int32), "weights": ((32,), np.float32)}
  np.testing.assert_array_equal(last["inputs"], window[:-1])
  np.testing.assert_array_equal(last["targets"], window[1:])
  np.testing.assert_array_equal(last["weights"], np.where(window[1:] == PAD, 0.0, 1.0))
  assert 0 < np.sum(last["weights"] == 0) < 32  # the padded last window
  batch = next(loader.make_train_iterator(ds, global_batch_size=4, seed=1, rows=[0, 2, 3]))
  order = loader.global_order(ds.num_windows, 1)
  windows = ds.windows([order[p] for p in (0, 2, 3)])
  np.testing.assert_array_equal(batch["inputs"], windows[:, :-1])
  np.testing.assert_array_equal(batch["targets"], windows[:, 1:])


def test_eval_batches_are_evenly_spaced(stdlib_dir):
  ds = data.load_windows("python_stdlib", "validation", 128, data_dir=stdlib_dir)
  batches = data.eval_batches(ds, 8, 3)
  assert len(batches) == 3
  expected = [ds.window(k * ds.num_windows // 24) for k in range(24)]
  inputs = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_array_equal(inputs, np.stack(expected)[:, :-1])
  for batch, again in zip(batches, data.eval_batches(ds, 8, 3)):
    for key, value in batch.items():
      np.testing.assert_array_equal(value, again[key])


def test_eval_batches_use_all_windows_when_few():
  ds = tiny_dataset()
  batches = data.eval_batches(ds, 3, 5)
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["inputs"][:2], [ds.window(0)[:-1], ds.window(1)[:-1]])
  np.testing.assert_array_equal(batches[0]["inputs"][2], [PAD] * 4)
  np.testing.assert_array_equal(batches[0]["weights"][2], [0.0] * 4)


# The index sampler.


def test_sampler_epochs_are_seeded_permutations():
  sampler = data.IndexSampler(10, seed=7)
  epochs = sampler.indices(0, 30).reshape(3, 10)
  for epoch, order in enumerate(epochs):
    np.testing.assert_array_equal(order, np.random.default_rng([7, epoch]).permutation(10))
    assert sorted(order) == list(range(10))
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(data.IndexSampler(10, seed=7).indices(0, 30).reshape(3, 10), epochs)
  assert not np.array_equal(data.IndexSampler(10, seed=8).indices(0, 10), epochs[0])


@settings(max_examples=60, deadline=None)
@given(
    num_windows=st.integers(1, 20),
    seed=st.integers(0, 2**32),
    position=st.integers(0, 100),
    count=st.integers(0, 50),
    draw=st.data(),
)
def test_sampler_is_resumable(num_windows, seed, position, count, draw):
  k = draw.draw(st.integers(0, count))
  whole = data.IndexSampler(num_windows, seed).indices(position, count)
  resumed = data.IndexSampler(num_windows, seed)
  parts = [resumed.indices(position, k), resumed.indices(position + k, count - k)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))
  assert whole.dtype == np.int64 and whole.shape == (count,)


# Any TFDS text dataset: lm1b, mocked.


@pytest.fixture
def mock_lm1b(tmp_path):
  """lm1b mocked by TFDS with 7 random records, from metadata written in `tmp_path`."""

  def mock(split_bytes: int):
    builder = tfds.builder("lm1b", data_dir=tmp_path, file_format="array_record")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[7], num_bytes=split_bytes)
        for split in ("train", "test")
    ]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    policy = tfds.testing.MockPolicy.USE_FILES
    return tfds.testing.mock_data(num_examples=7, policy=policy, data_dir=str(tmp_path))

  return mock


@pytest.mark.parametrize("split_bytes", [0, 2**40])  # in memory; offsets cached on disk
def test_generic_tfds_dataset(mock_lm1b, tmp_path, split_bytes):
  with mock_lm1b(split_bytes):
    ds = data.load_windows("lm1b", "test", 5, data_dir=str(tmp_path))
    source = tfds.data_source("lm1b", split="test", data_dir=str(tmp_path))
    texts = [source[i]["text"] for i in range(len(source))]
  assert len(texts) == 7 and all(texts)
  stream = reference_stream(texts)
  assert ds.num_tokens == len(stream)
  np.testing.assert_array_equal(unwindow(ds)[: len(stream)], stream)
  caches = list(tmp_path.glob("lm1b/*/sparsejax-offsets.test.text.npy"))
  assert len(caches) == (split_bytes > pipeline.MAX_IN_MEMORY_BYTES)


def test_generic_tfds_errors(mock_lm1b, tmp_path):
  with mock_lm1b(0):
    with pytest.raises(ValueError, match=r"split='validation'.*\['test', 'train'\]"):
      data.load_windows("lm1b", "validation", 8, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"text_key='content'.*\['text'\]"):
      data.load_windows("lm1b", "train", 8, data_dir=str(tmp_path), text_key="content")


# Clear errors.


def test_load_errors(stdlib_dir):
  with pytest.raises(ValueError, match="name='no_such_dataset'"):
    data.load_windows("no_such_dataset", "train", 8, data_dir=stdlib_dir)
  with pytest.raises(ValueError, match="seq_len=0"):
    data.load_windows("python_stdlib", "train", 0, data_dir=stdlib_dir)
  with pytest.raises(ValueError, match=r"split='test'.*\['train', 'validation'\]"):
    data.load_windows("python_stdlib", "test", 8, data_dir=stdlib_dir)
  with pytest.raises(ValueError, match=r"text_key='content'.*\['path', 'text'\]"):
    data.load_windows("python_stdlib", "train", 8, data_dir=stdlib_dir, text_key="content")


def test_batch_and_sampler_errors():
  ds = tiny_dataset()
  sampler = data.IndexSampler(ds.num_windows, seed=0)
  with pytest.raises(ValueError, match="batch_size=0"):
    data.eval_batches(ds, 0, 1)
  with pytest.raises(ValueError, match="num_batches=0"):
    data.eval_batches(ds, 1, 0)
  with pytest.raises(ValueError, match="seed=-1"):
    data.IndexSampler(3, seed=-1)
  with pytest.raises(ValueError, match="position=-1"):
    sampler.indices(-1, 1)
  with pytest.raises(ValueError, match="text_key='body'"):
    data.WindowDataset([{"text": b"ab"}], 4, text_key="body")
  with pytest.raises(ValueError, match="at least 2 tokens"):
    data.WindowDataset([], 4)


@pytest.mark.parametrize("in_memory", [True, False])
def test_token_counts_match_the_naive_stream(in_memory):
  texts = ["ab", "", "caab\u00e9"]
  ds = data.WindowDataset([{"text": t} for t in texts], 4, in_memory=in_memory)
  expected = np.bincount(reference_stream(texts), minlength=data.VOCAB_SIZE)
  np.testing.assert_array_equal(ds.token_counts(data.VOCAB_SIZE), expected)
