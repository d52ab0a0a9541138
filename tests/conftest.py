"""Test setup: fake 8 CPU devices before JAX initialises its backends."""
import os

# Test programs are tiny, so XLA's compile time dominates their run time: compile with the
# backend's optimisation level 0 (same semantics, less LLVM work).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests build the same small trainer programs; a compilation cache shared by the xdist
# workers compiles each once. Cache keys cover the program, the JAX version and the flags.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"sparsejax-test-xla-cache-{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory) -> str:
  """One TFDS data_dir for the whole session; the embedded corpus is prepared there on first use."""
  return str(tmp_path_factory.mktemp("tfds"))
