"""Activation caches for SAE training: the rows of an [*, D] activation stream, on disk or in RAM.

A cache is a random-access source for `experiments.data.loader`: `len(ds)` rows and `ds[i]` the
example {"inputs": float32 [D]}, plus {"targets": float32 [D_out]} when it pairs each row with a
target row (a transcoder's input and output sites). `ActivationDataset` reads an array_record
file written by `write_activations`; `ArrayActivations` holds arrays in memory. Both have a
one-line `summary()` and `array()`, every input row as one float32 [len, D] array.

File format: one record per row, its D values as little-endian float32 bytes, so D is the
record size / 4. Records are written with group size 1 (reading a row reads one record) and
uncompressed (activations barely compress: brotli saves nothing and writes 5x slower).
"""
import os
from typing import Iterable

from array_record.python import array_record_data_source
from array_record.python import array_record_module
import numpy as np

RECORD_OPTIONS = "group_size:1,uncompressed"
ROW_DTYPE = np.dtype("<f4")
# Rows read per batch by `ActivationDataset.array()`.
_READ_CHUNK = 65_536


def write_activations(path: str | os.PathLike, arrays_TD_iter: Iterable[np.ndarray]) -> int:
  """Writes the rows of each [T, D] array, in order, as float32 records; returns the row count.

  The arrays may be NumPy or JAX arrays of any float dtype and must share D. The file appears at
  `path` only once complete (written to `path + ".tmp"`, then renamed), so a reader never sees a
  partial cache.
  """
  path = os.fspath(path)
  partial = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(partial, RECORD_OPTIONS)
  try:
    try:
      num_rows = _write_rows(writer, arrays_TD_iter)
    finally:
      writer.close()
  except BaseException:
    os.remove(partial)
    raise
  os.replace(partial, path)
  return num_rows


def _write_rows(writer: array_record_module.ArrayRecordWriter,
                arrays_TD_iter: Iterable[np.ndarray]) -> int:
  """Writes every row of every array as one record; returns the row count."""
  num_rows, width = 0, None
  for x_TD in arrays_TD_iter:
    x_TD = np.asarray(x_TD, ROW_DTYPE)
    if x_TD.ndim != 2 or x_TD.shape[1] < 1 or width not in (None, x_TD.shape[1]):
      raise ValueError(f"arrays_TD_iter must hold [T, D] arrays of one width D >= 1"
                       f"{'' if width is None else f' (here {width})'}, got shape {x_TD.shape}")
    width = x_TD.shape[1]
    for row_D in x_TD:
      writer.write(row_D.tobytes())
    num_rows += len(x_TD)
  return num_rows


class ActivationDataset:
  """The activation rows of an array_record file from `write_activations`, read on demand.

  `ds[i]` is {"inputs": float32 [D]} (+ {"targets": float32 [D_out]}, row i of the file
  `targets_path`, which must hold as many rows).
  """

  def __init__(self, path: str | os.PathLike, targets_path: str | os.PathLike | None = None):
    self.path = os.fspath(path)
    self.targets_path = None if targets_path is None else os.fspath(targets_path)
    self._inputs, self.d_in = _open("path", self.path)
    self._targets, self.d_out = None, None
    if self.targets_path is not None:
      self._targets, self.d_out = _open("targets_path", self.targets_path)
      if len(self._targets) != len(self._inputs):
        raise ValueError(f"targets_path={self.targets_path!r} holds {len(self._targets):,} rows, "
                         f"path={self.path!r} {len(self._inputs):,}; they must pair up")

  def __len__(self) -> int:
    return len(self._inputs)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < len(self):
      raise IndexError(f"row index i={i} is outside [0, {len(self)})")
    example = {"inputs": _row(self._inputs[i])}
    if self._targets is not None:
      example["targets"] = _row(self._targets[i])
    return example

  def array(self) -> np.ndarray:
    """Every input row, in order: float32 [len, D]."""
    out_TD = np.empty((len(self), self.d_in), np.float32)
    for start in range(0, len(self), _READ_CHUNK):
      records = self._inputs.__getitems__(range(start, min(start + _READ_CHUNK, len(self))))
      out_TD[start : start + len(records)] = np.frombuffer(b"".join(records), ROW_DTYPE).reshape(
          len(records), self.d_in)
    return out_TD

  def summary(self) -> str:
    """One line for a start-up banner: file, rows, width (and the targets' width)."""
    targets = "" if self.d_out is None else f" -> {self.d_out} target features"
    return f"{self.path}: {len(self):,} activation rows of {self.d_in} features{targets}"


class ArrayActivations:
  """Activation rows held in memory: `ds[i]` is {"inputs": inputs_TD[i]} (+ "targets")."""

  def __init__(self, array_TD: np.ndarray, targets_TD: np.ndarray | None = None):
    self.inputs = _rows("array_TD", array_TD)
    self.targets = None if targets_TD is None else _rows("targets_TD", targets_TD)
    if self.targets is not None and len(self.targets) != len(self.inputs):
      raise ValueError(f"targets_TD has {len(self.targets):,} rows and array_TD "
                       f"{len(self.inputs):,}; they must pair up")

  def __len__(self) -> int:
    return len(self.inputs)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < len(self):
      raise IndexError(f"row index i={i} is outside [0, {len(self)})")
    if self.targets is None:
      return {"inputs": self.inputs[i]}
    return {"inputs": self.inputs[i], "targets": self.targets[i]}

  def array(self) -> np.ndarray:
    """Every input row: float32 [len, D]."""
    return self.inputs

  def summary(self) -> str:
    """One line for a start-up banner: rows, width (and the targets' width)."""
    targets = "" if self.targets is None else f" -> {self.targets.shape[1]} target features"
    return (f"in memory: {len(self):,} activation rows of {self.inputs.shape[1]} features"
            f"{targets}")


def _open(argument: str, path: str) -> tuple[array_record_data_source.ArrayRecordDataSource, int]:
  """The data source of the array_record file `path` and its row width D."""
  if not os.path.isfile(path):
    raise ValueError(f"{argument}={path!r} is not a file; write it with write_activations")
  source = array_record_data_source.ArrayRecordDataSource(path)
  if not len(source):
    raise ValueError(f"{argument}={path!r} holds no activation rows")
  return source, len(source[0]) // ROW_DTYPE.itemsize


def _row(record: bytes) -> np.ndarray:
  return np.frombuffer(record, ROW_DTYPE).astype(np.float32)


def _rows(argument: str, x_TD: np.ndarray) -> np.ndarray:
  """`x_TD` as a float32 [T, D] array with T, D >= 1, else a ValueError naming `argument`."""
  x_TD = np.asarray(x_TD, np.float32)
  if x_TD.ndim != 2 or 0 in x_TD.shape:
    raise ValueError(f"{argument} must be a non-empty [T, D] array, got shape {x_TD.shape}")
  return x_TD
