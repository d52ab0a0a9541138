"""The embedded default corpus: the running Python's standard library as a TFDS dataset.

Every `*.py` file under `sysconfig.get_paths()["stdlib"]`, test folders excluded, becomes one
example `{"path": relative posix path, "text": the file's raw bytes}`. Records keep sorted path
order. A file goes to `validation` when the first 8 bytes of sha256(path), read as a big-endian
integer, are < 50 modulo 1000 (about 5% of files), else to `train`; the rule depends on the path
only, so it is the same on every run and machine.

Nothing is downloaded and TensorFlow is not needed: prepare with
`PythonStdlib(data_dir=..., file_format="array_record").download_and_prepare()` and read
with `builder.as_data_source()`. Preparing prints one line of its own before and one after,
instead of TFDS's "Downloading and preparing dataset" (nothing is downloaded). The builder
config is named after the full Python version (`py3_11_7`), so another Python never reuses a
corpus prepared by this one; the version is also in `builder.info.metadata["python_version"]`.
"""
import hashlib
import os
import pathlib
import platform
import sysconfig
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NAME = "python_stdlib"
SPLITS = ("train", "validation")
VALIDATION_PER_MILLE = 50

# Directory names skipped wherever they occur (this covers lib2to3/tests), and directories
# skipped at exactly this relative path.
_EXCLUDED_DIR_NAMES = frozenset({"test", "tests", "site-packages"})
_EXCLUDED_DIR_PATHS = frozenset({"idlelib/idle_test"})


def stdlib_root() -> pathlib.Path:
  """The directory holding the running Python's pure-Python standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def config_name(version: str | None = None) -> str:
  """The builder config name for a Python version, e.g. "3.11.7" -> "py3_11_7"."""
  return "py" + (version or platform.python_version()).replace(".", "_")


def is_excluded_dir(relative_dir: str) -> bool:
  """Whether a directory (posix path relative to the stdlib root) holds no corpus files."""
  parts = relative_dir.split("/")
  return relative_dir in _EXCLUDED_DIR_PATHS or bool(_EXCLUDED_DIR_NAMES.intersection(parts))


def list_sources(root: pathlib.Path) -> list[str]:
  """Sorted posix paths, relative to `root`, of the `*.py` files outside excluded dirs."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    relative_dir = pathlib.Path(dirpath).relative_to(root).as_posix()
    prefix = "" if relative_dir == "." else relative_dir + "/"
    dirnames[:] = [d for d in dirnames if not is_excluded_dir(prefix + d)]
    paths.extend(prefix + f for f in filenames if f.endswith(".py"))
  return sorted(paths)


def split_of(relative_path: str) -> str:
  """The split ("train" or "validation") of a file, from sha256 of its relative path."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % 1000
  return "validation" if bucket < VALIDATION_PER_MILLE else "train"


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the running Python's standard-library sources (no download, no TF)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=config_name(),
          description=f"Standard library of Python {platform.python_version()}.",
      )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Source files of the running Python's standard library.",
        features=tfds.features.FeaturesDict({
            "path": tfds.features.Text(),
            "text": tfds.features.Scalar(dtype=np.object_, doc="The file's raw bytes."),
        }),
        homepage="https://docs.python.org/3/library/",
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(python_version=platform.python_version()),
    )

  def _log_download_bytes(self) -> None:
    """Announces the preparation (TFDS would print "Downloading and preparing dataset") and
    keeps TFDS's progress bars off the console until it is done (it takes seconds)."""
    tfds.disable_progress_bar()
    num_files = len(list_sources(stdlib_root()))
    print(f"preparing the embedded corpus {NAME} ({num_files} files of Python"
          f" {platform.python_version()}) ...", flush=True)

  def _log_download_done(self) -> None:
    tfds.enable_progress_bar()
    print(f"prepared {NAME} in {self.data_dir}", flush=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    root = stdlib_root()
    paths = list_sources(root)
    return {
        split: self._generate_examples(root, [p for p in paths if split_of(p) == split])
        for split in SPLITS
    }

  def _generate_examples(self, root: pathlib.Path, paths: list[str]) -> Iterator[tuple[int, dict]]:
    for index, path in enumerate(paths):
      yield index, {"path": path, "text": (root / path).read_bytes()}
