"""Test setup: fake 8 CPU devices before JAX initialises its backends."""
import os

# Test programs are tiny, so XLA's compile time dominates their run time: compile with the
# backend's optimisation level 0 and XLA:CPU's elemental (not MLIR fusion) emitters, which
# compile a train step about 3x faster (same semantics, less codegen work).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests build the same small trainer programs; a compilation cache shared by the xdist
# workers and by the `python -m experiments.train` subprocesses of the CLI tests (they inherit
# this environment) compiles each once. Cache keys cover the program, the JAX version and the
# flags.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    tempfile.gettempdir(), f"sparsejax-test-xla-cache-{os.getuid()}")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory) -> str:
  """One TFDS data_dir for the whole session; the embedded corpus is prepared there on first use."""
  return str(tmp_path_factory.mktemp("tfds"))
