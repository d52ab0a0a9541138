"""Fixtures shared by the trainer test modules (one computation per pytest process)."""
import pytest

from tests.experiments import test_trainer


@pytest.fixture(scope="session")
def tiny_lm_run(stdlib_data_dir, tmp_path_factory):
  """One uninterrupted run of `test_trainer.tiny_config`: (workdir, summary, final params as
  numpy). Tests only read its workdir; one that needs to change it works on a copy."""
  workdir = tmp_path_factory.mktemp("tiny_lm_run")
  summary, params = test_trainer.run(test_trainer.tiny_config(stdlib_data_dir), workdir)
  return workdir, summary, params
