"""Test setup: fake 8 CPU devices before JAX initialises its backends."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory) -> str:
  """One TFDS data_dir for the whole session; the embedded corpus is prepared there on first use."""
  return str(tmp_path_factory.mktemp("tfds"))
