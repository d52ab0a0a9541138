"""Byte-level language-model windows over TFDS text datasets, read without TensorFlow.

A split is one token stream: each record's text as UTF-8 bytes (tokens 0..255) followed by
EOS_ID, records in stored order. With T = seq_len and N stream tokens, window i is
stream[i*T : i*T + T + 1], padded with PAD_ID past the end; there are num_windows =
ceil((N - 1) / T) windows, so every stream token but the first is a target exactly once.

A `WindowDataset` is a random-access source for `experiments.data.loader`, which reads the
training batches through Grain: `len(ds)` windows, `ds[i]` the example {"inputs": int32 [T],
"targets": int32 [T], "weights": float32 [T]} of window i (targets shifted by one, weight 0
where the target is PAD_ID). `eval_batches` gives deterministic evaluation batches.

`IndexSampler` is a NumPy permutation per epoch, the order `experiments.claims.memory_finetune`
draws its own batches in (its published table was made with it); the trainer uses the loader.

Data comes from TFDS array_record files through `builder.as_data_source()` (random access, no
TensorFlow). Per-record token offsets let `window(i)` read only the records it overlaps; splits
up to `MAX_IN_MEMORY_BYTES` are instead read once into one array.
"""
import os
import re
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from experiments.data import stdlib_corpus  # Also registers the python_stdlib builder.

PAD_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258
# Splits whose serialized size is at most this are materialised as one in-memory stream.
MAX_IN_MEMORY_BYTES = 256 * 2**20


def _check_positive(name: str, value: int) -> None:
  if value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")


def _check_non_negative(name: str, value: int) -> None:
  if value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {name}={value!r}")


def _record_tokens(record: Mapping[str, Any], text_key: str) -> np.ndarray:
  """The tokens of one record: its text's UTF-8 bytes then EOS_ID, as uint16 [len + 1]."""
  if text_key not in record:
    raise ValueError(f"text_key={text_key!r} is not in the record; it has {sorted(record)}")
  text = record[text_key]
  if isinstance(text, str):
    text = text.encode("utf-8")
  if not isinstance(text, bytes):
    raise ValueError(
        f"text_key={text_key!r} holds {type(text).__name__}, not text (str or bytes)"
    )
  tokens = np.empty(len(text) + 1, np.uint16)
  tokens[:-1] = np.frombuffer(text, np.uint8)
  tokens[-1] = EOS_ID
  return tokens


def _pad(tokens: np.ndarray, length: int) -> np.ndarray:
  """`tokens` as int32, right-padded with PAD_ID to `length`."""
  out = np.full(length, PAD_ID, np.int32)
  out[: len(tokens)] = tokens
  return out


def _prefix_sums(lengths: Sequence[int]) -> np.ndarray:
  """Record start offsets then the total: int64 [len(lengths) + 1], starting at 0."""
  return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _count_offsets(source: Sequence[Mapping[str, Any]], text_key: str) -> np.ndarray:
  """`_prefix_sums` of the token lengths of all records of `source`, read once."""
  return _prefix_sums([len(_record_tokens(source[k], text_key)) for k in range(len(source))])


def _cached_offsets(
    source: Sequence[Mapping[str, Any]], text_key: str, path: epath.Path
) -> np.ndarray:
  """`_count_offsets`, loaded from `path` when saved there before, else computed and saved."""
  if path.exists():
    with path.open("rb") as f:
      offsets = np.load(f)
    if len(offsets) == len(source) + 1:
      return offsets
  offsets = _count_offsets(source, text_key)
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  try:
    with tmp.open("wb") as f:
      np.save(f, offsets)
    tmp.rename(path)
  except OSError as e:
    logging.warning("Could not cache token offsets at %s: %s", path, e)
  return offsets


class WindowDataset:
  """Fixed-length token windows over one split, read as a single token stream.

  A random-access source of examples: `len(ds)` is num_windows and `ds[i]` window i's example
  {"inputs": int32 [T], "targets": int32 [T], "weights": float32 [T]}.

  Attributes:
    name: the dataset's name, e.g. "python_stdlib" ("" when built from plain records).
    split: the split read, e.g. "train[:10%]" ("" when built from plain records).
    seq_len: T; a window holds T + 1 tokens (inputs are its first T, targets its last T).
    num_tokens: N, the length of the stream (text bytes plus one EOS per record).
    num_windows: ceil((N - 1) / T).
    metadata: the dataset's metadata (e.g. {"python_version": "3.11.7"}), possibly empty.
  """

  def __init__(
      self,
      source: Sequence[Mapping[str, Any]],
      seq_len: int,
      *,
      text_key: str = "text",
      in_memory: bool = True,
      offsets_path: epath.Path | None = None,
      metadata: Mapping[str, Any] | None = None,
      name: str = "",
      split: str = "",
  ):
    """Indexes `source` (records with a text feature) into windows.

    Args:
      source: random-access records, e.g. a TFDS data source or a list of dicts.
      seq_len: T, tokens per training example.
      text_key: the feature of each record holding its text (str or bytes).
      in_memory: read every record once into one array (fast windows, memory ~2 bytes per
        token); otherwise keep only record offsets and read a window's records on demand.
      offsets_path: where to cache the record offsets when not `in_memory`; None: no cache.
      metadata: the dataset's metadata, exposed as `self.metadata`.
      name: the dataset's name, for `summary`.
      split: the split read, for `summary`.
    """
    _check_positive("seq_len", seq_len)
    self.name = name
    self.split = split
    self.seq_len = seq_len
    self.metadata = dict(metadata or {})
    self._source = source
    self._text_key = text_key
    pieces = None
    if in_memory:
      pieces = [_record_tokens(source[k], text_key) for k in range(len(source))]
      self._offsets = _prefix_sums([len(p) for p in pieces])
    elif offsets_path is None:
      self._offsets = _count_offsets(source, text_key)
    else:
      self._offsets = _cached_offsets(source, text_key, offsets_path)
    self.num_tokens = int(self._offsets[-1])
    if self.num_tokens < 2:
      raise ValueError(
          f"the split has {len(source)} records and {self.num_tokens} tokens; windows need at"
          " least 2 tokens"
      )
    self.num_windows = -(-(self.num_tokens - 1) // seq_len)
    # The whole stream, PAD-padded to cover the last window, when `in_memory`.
    self._stream = None
    if pieces is not None:
      self._stream = np.full(self.num_windows * seq_len + 1, PAD_ID, np.uint16)
      self._stream[: self.num_tokens] = np.concatenate(pieces)

  def __len__(self) -> int:
    return self.num_windows

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    """Window `i` as an example: inputs, targets int32 [T], weights float32 [T]."""
    return _make_examples(self.window(i))

  def summary(self) -> str:
    """One line for a start-up banner: name[split], windows, tokens."""
    return (f"{self.name}[{self.split}]: {self.num_windows:,} windows of {self.seq_len} tokens"
            f" ({self.num_tokens:,} tokens)")

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the stream: int64 [vocab_size] (one pass if on demand)."""
    if self._stream is not None:
      return np.bincount(self._stream[: self.num_tokens], minlength=vocab_size)
    counts = np.zeros(vocab_size, np.int64)
    for k in range(len(self._source)):
      counts += np.bincount(_record_tokens(self._source[k], self._text_key), minlength=vocab_size)
    return counts

  def window(self, i: int) -> np.ndarray:
    """Window `i`: int32 [seq_len + 1], stream tokens i*T .. i*T + T, PAD_ID past the end."""
    if not 0 <= i < self.num_windows:
      raise IndexError(f"window index i={i} is outside [0, num_windows={self.num_windows})")
    start = i * self.seq_len
    stop = start + self.seq_len + 1
    if self._stream is not None:
      return self._stream[start:stop].astype(np.int32)
    first = int(np.searchsorted(self._offsets, start, side="right")) - 1
    last = min(int(np.searchsorted(self._offsets, stop, side="left")), len(self._source))
    tokens = np.concatenate(
        [_record_tokens(self._source[k], self._text_key) for k in range(first, last)]
    )
    skip = start - int(self._offsets[first])
    return _pad(tokens[skip : skip + self.seq_len + 1], self.seq_len + 1)

  def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """The windows at `indices`, stacked: int32 [len(indices), seq_len + 1]."""
    indices = np.asarray(indices, np.int64)
    if self._stream is None:
      return np.stack([self.window(int(i)) for i in indices])
    if np.any((indices < 0) | (indices >= self.num_windows)):
      raise IndexError(f"window indices must lie in [0, num_windows={self.num_windows})")
    starts = indices * self.seq_len
    return self._stream[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder called `name`, python_stdlib included."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    first_line = str(e).split("\n", 1)[0]
    raise ValueError(
        f"unknown dataset name={name!r}: it is neither {stdlib_corpus.NAME!r} nor a TFDS"
        f" dataset ({first_line})"
    ) from None


def _offsets_path(builder: tfds.core.DatasetBuilder, split: str, text_key: str) -> epath.Path:
  """Where the record offsets of `split`/`text_key` are cached, next to the prepared data."""
  safe_split = re.sub(r"[^\w.-]", "_", split)
  return builder.data_path / f"sparsejax-offsets.{safe_split}.{text_key}.npy"


def load_windows(
    name: str,
    split: str,
    seq_len: int,
    *,
    data_dir: str | None = None,
    text_key: str = "text",
) -> WindowDataset:
  """Windows of `seq_len + 1` tokens over `split` of the TFDS dataset `name`.

  The dataset is prepared as array_record on first use (`python_stdlib`, the embedded corpus,
  needs no download) and read without TensorFlow.

  Args:
    name: "python_stdlib" or any TFDS dataset name, e.g. "lm1b".
    split: a split of the dataset, e.g. "train", "validation", "train[:10%]".
    seq_len: T, tokens per training example.
    data_dir: TFDS data directory; None: TFDS's default (~/tensorflow_datasets or
      $TFDS_DATA_DIR).
    text_key: the feature holding each record's text ("text" for python_stdlib).

  Returns:
    The split's `WindowDataset`.

  Raises:
    ValueError: for an unknown dataset, split or text_key, or seq_len < 1.
  """
  _check_positive("seq_len", seq_len)
  builder = _builder(name, data_dir)
  features = sorted(builder.info.features.keys())
  if text_key not in features:
    raise ValueError(
        f"text_key={text_key!r} is not a feature of {name!r}; available features: {features}"
    )
  if not builder.is_prepared():
    clock = time.perf_counter()
    builder.download_and_prepare(file_format="array_record")
    logging.info("Prepared %s in %.1f s", builder.info.full_name, time.perf_counter() - clock)
  try:
    split_info = builder.info.splits[split]
  except ValueError:
    raise ValueError(
        f"split={split!r} does not exist in {name!r}; available splits:"
        f" {sorted(builder.info.splits)}"
    ) from None
  in_memory = split_info.num_bytes <= MAX_IN_MEMORY_BYTES
  return WindowDataset(
      builder.as_data_source(split=split),
      seq_len,
      text_key=text_key,
      in_memory=in_memory,
      offsets_path=None if in_memory else _offsets_path(builder, split, text_key),
      metadata=builder.info.metadata,
      name=name,
      split=split,
  )


class IndexSampler:
  """A seeded, resumable, infinite sequence of window indices, one permutation per epoch.

  Element p is perm(seed, epoch=p // num_windows)[p % num_windows], where perm(seed, epoch) is
  `np.random.default_rng([seed, epoch]).permutation(num_windows)`. The sampler's state is the
  integer position p alone: training step s with batch size B reads positions [s*B, (s+1)*B).
  """

  def __init__(self, num_windows: int, seed: int):
    _check_positive("num_windows", num_windows)
    _check_non_negative("seed", seed)
    self.num_windows = num_windows
    self.seed = seed
    self._epoch = -1
    self._perm = np.empty(0, np.int64)

  def _permutation(self, epoch: int) -> np.ndarray:
    """perm(seed, epoch), remembered for the latest epoch asked for."""
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      self._epoch = epoch
    return self._perm

  def indices(self, position: int, count: int) -> np.ndarray:
    """Elements [position, position + count) of the sequence: int64 [count]."""
    _check_non_negative("position", position)
    _check_non_negative("count", count)
    out = np.empty(count, np.int64)
    done = 0
    while done < count:
      epoch, offset = divmod(position + done, self.num_windows)
      take = min(self.num_windows - offset, count - done)
      out[done : done + take] = self._permutation(epoch)[offset : offset + take]
      done += take
    return out


def _make_examples(windows_L: np.ndarray) -> dict[str, np.ndarray]:
  """Examples from windows [..., T + 1]: inputs, targets (shifted by one), weights.

  Returns:
    {"inputs": int32 [..., T], "targets": int32 [..., T], "weights": float32 [..., T]} with
    weights 0.0 where the target is PAD_ID, else 1.0.
  """
  targets_T = windows_L[..., 1:].astype(np.int32)
  return {
      "inputs": windows_L[..., :-1].astype(np.int32),
      "targets": targets_T,
      "weights": (targets_T != PAD_ID).astype(np.float32),
  }


def eval_batches(
    ds: WindowDataset, batch_size: int, num_batches: int
) -> list[dict[str, np.ndarray]]:
  """Deterministic evaluation batches: `batch_size * num_batches` evenly spaced windows.

  Window k of the B * num_batches taken is floor(k * num_windows / (B * num_batches)). When the
  split has fewer windows, all of them are used, in order, in ceil(num_windows / B) batches; the
  last is filled up with all-PAD windows (weight 0), so every batch has shape [B, T].
  """
  _check_positive("batch_size", batch_size)
  _check_positive("num_batches", num_batches)
  total = batch_size * num_batches
  if ds.num_windows > total:
    indices = np.arange(total, dtype=np.int64) * ds.num_windows // total
  else:
    indices = np.arange(ds.num_windows, dtype=np.int64)
  windows_NL = ds.windows(indices)
  filler = (-len(windows_NL)) % batch_size
  windows_NL = np.concatenate([windows_NL, np.full((filler, ds.seq_len + 1), PAD_ID, np.int32)])
  return [
      _make_examples(windows_NL[start : start + batch_size])
      for start in range(0, len(windows_NL), batch_size)
  ]
