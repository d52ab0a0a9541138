"""The trainer survives what a real run meets: corrupt or partial checkpoints, a resume with
another model, a kill -9 during a save, command-line overrides of None fields, preemption."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import checkpoints as ckpt_lib
from experiments import metrics as metrics_lib
from experiments import trainer as trainer_lib
from tests.experiments.test_trainer import REPO
from tests.experiments.test_trainer import assert_trees_close
from tests.experiments.test_trainer import cli_environment
from tests.experiments.test_trainer import losses
from tests.experiments.test_trainer import run
from tests.experiments.test_trainer import saved_steps
from tests.experiments.test_trainer import tiny_config


def _cli(data_dir, workdir, *overrides, config="experiments/configs/lm_dense.py"):
  """`python -m experiments.train` on a tiny model; (exit status, stdout, stderr)."""
  args = [sys.executable, "-m", "experiments.train", f"--config={config}",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.max_len=32",
          "--config.train.seq_len=32", "--config.train.batch_size=4",
          "--config.train.eval_batches=1", *overrides]
  return subprocess.Popen(args, cwd=REPO, env=cli_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=180):
  stdout, stderr = proc.communicate(timeout=timeout)
  return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def stopped_at_6(stdlib_data_dir, tmp_path_factory):
  """A run pre-empted at step 6 with checkpoints every 2 steps, for the tests to copy."""
  workdir = tmp_path_factory.mktemp("stopped_at_6")
  config = tiny_config(stdlib_data_dir, log_every=1)
  config.checkpoint.every = 2
  run(config, workdir, stop_at_step=6)
  return workdir


def _corrupt_data_file(step_dir):
  """Overwrites the largest file under a checkpoint step with random bytes."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  target = max(files, key=os.path.getsize)
  with open(target, "wb") as f:
    f.write(np.random.default_rng(0).bytes(os.path.getsize(target)))


def _truncate_metadata(step_dir):
  """Cuts every JSON metadata file of a checkpoint step in half."""
  for d, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(d, name)
      if "metadata" in name or name.endswith(".json"):
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def _stray_folder(workdir):
  """A step folder with nothing of a checkpoint in it, newer than every good step (4)."""
  shutil.rmtree(workdir / "checkpoints" / "6")
  os.makedirs(workdir / "checkpoints" / "6" / "state")
  (workdir / "checkpoints" / "6" / "state" / "junk").write_bytes(b"\x00garbage")


@pytest.mark.parametrize("damage", ["random_bytes", "truncated_metadata", "stray_folder"])
def test_a_damaged_latest_step_is_skipped_for_the_newest_good_one(stdlib_data_dir, tmp_path,
                                                                    stopped_at_6, tiny_lm_run,
                                                                    damage, capsys):
  config = tiny_config(stdlib_data_dir, log_every=1)
  config.checkpoint.every = 2
  shutil.copytree(stopped_at_6, tmp_path, dirs_exist_ok=True)
  if damage == "random_bytes":
    _corrupt_data_file(tmp_path / "checkpoints" / "6")
  elif damage == "truncated_metadata":
    _truncate_metadata(tmp_path / "checkpoints" / "6")
  else:
    _stray_folder(tmp_path)
  capsys.readouterr()
  summary, params = run(config, tmp_path)
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint step 6")]
  assert len(warnings) == 1, out
  assert "resumed from" in out and "at step 4" in out
  assert summary["step"] == 8
  assert_trees_close(params, tiny_lm_run[2], rtol=1e-6)  # the uninterrupted run's
  assert sorted(r["step"] for r in metrics_lib.read_metrics(str(tmp_path))) == list(range(1, 9))
  assert os.listdir(tmp_path / "unreadable_checkpoints")


@pytest.fixture(scope="module")
def cli_run_of_2_steps(stdlib_data_dir, tmp_path_factory):
  """The workdir of a finished 2-step command-line run, for the tests to copy."""
  workdir = tmp_path_factory.mktemp("cli_run_of_2_steps")
  code, _, stderr = _finish(_cli(stdlib_data_dir, workdir, "--config.train.num_steps=2"))
  assert code == 0, stderr
  return workdir


def test_no_step_restores_is_a_one_line_error(stdlib_data_dir, tmp_path, cli_run_of_2_steps):
  shutil.copytree(cli_run_of_2_steps, tmp_path, dirs_exist_ok=True)
  _corrupt_data_file(tmp_path / "checkpoints" / "2")
  code, _, stderr = _finish(_cli(stdlib_data_dir, tmp_path, "--config.train.num_steps=4"))
  assert code == 1, stderr
  assert stderr.strip().splitlines()[-1].startswith("error: no checkpoint in"), stderr
  assert "Traceback" not in stderr


def test_resume_with_another_model_stops_in_five_lines(stdlib_data_dir, tmp_path,
                                                       cli_run_of_2_steps):
  shutil.copytree(cli_run_of_2_steps, tmp_path, dirs_exist_ok=True)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 32
  code, _, stderr = _finish(_cli(stdlib_data_dir, tmp_path, "--config.train.num_steps=4",
                                 "--config.model.d_model=64"))
  assert code == 1
  assert len(stderr.strip().splitlines()) <= 5, stderr
  assert "model.d_model: 32 -> 64" in stderr and "train.num_steps" in stderr  # listed as allowed
  assert "Traceback" not in stderr


def test_a_longer_run_resumes_and_none_fields_and_layer_args_are_settable(stdlib_data_dir,
                                                                           tmp_path):
  moe = ["--config.model.ffn.capacity_factor=1.25", "--config.model.ffn.implementation=reference",
         "--config.model.ffn.num_experts=4"]
  code, stdout, stderr = _finish(_cli(stdlib_data_dir, tmp_path, "--config.train.num_steps=2", *moe,
                                      config="experiments/configs/moe_lm.py"))
  assert code == 0, stderr
  saved = json.loads((tmp_path / "config.json").read_text())["model"]["ffn"]
  assert saved["capacity_factor"] == 1.25 and saved["implementation"] == "reference"
  assert "devices: 1 x" in stdout and "active per token" in stdout and "compiling" in stdout
  assert "Downloading and preparing" not in stdout + stderr
  code, stdout, stderr = _finish(_cli(stdlib_data_dir, tmp_path, "--config.train.num_steps=3", *moe,
                                      config="experiments/configs/moe_lm.py"))
  assert code == 0, stderr
  assert "resumed from" in stdout and "done at step 3" in stdout


def _wait_for_tmp_checkpoint(directory, proc, deadline):
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(directory) and any("tmp" in name for name in os.listdir(directory)):
      return True
    time.sleep(0.002)
  return False


def test_kill_9_during_a_save_resumes_exactly_with_one_record_per_step(stdlib_data_dir, tmp_path):
  common = ["--config.train.num_steps=40", "--config.train.log_every=1",
            "--config.train.eval_every=40"]
  reference_dir = tmp_path / "reference"  # uninterrupted: it needs no checkpoint before the end
  code, _, stderr = _finish(_cli(stdlib_data_dir, reference_dir, *common,
                                 "--config.checkpoint.every=40"))
  assert code == 0, stderr
  killed_dir = tmp_path / "killed"
  saving = [*common, "--config.checkpoint.every=2"]
  proc = _cli(stdlib_data_dir, killed_dir, *saving)
  deadline = time.time() + 120
  # Skip the first saves so that the kill lands after some progress, inside a save.
  while time.time() < deadline and len([s for s in saved_steps_or_none(killed_dir)]) < 3:
    time.sleep(0.01)
  caught = _wait_for_tmp_checkpoint(killed_dir / "checkpoints", proc, deadline)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert caught, "no save in progress was seen before the run ended"
  code, stdout, stderr = _finish(_cli(stdlib_data_dir, killed_dir, *saving))
  assert code == 0, stderr
  steps = [r["step"] for r in metrics_lib.read_metrics(str(killed_dir))]
  assert steps == list(range(1, 41))
  reference_losses, killed_losses = losses(reference_dir), losses(killed_dir)
  for step in range(1, 41):
    assert killed_losses[step] == pytest.approx(reference_losses[step], rel=1e-5), step


def saved_steps_or_none(workdir):
  return saved_steps(workdir) if os.path.isdir(workdir / "checkpoints") else []


def test_non_finite_update_is_named(stdlib_data_dir, tmp_path):
  config = tiny_config(stdlib_data_dir, log_every=1)  # step 1: finite loss, NaN update
  config.train.learning_rate = float("nan")
  with pytest.raises(trainer_lib.NonFiniteLossError,
                     match=r"parameter update \(train/update_norm=nan, while train/loss=5.*finite\)"):
    run(config, tmp_path)


def test_a_model_that_fits_no_step_moves_nothing(stdlib_data_dir, tmp_path, tiny_lm_run):
  shutil.copytree(tiny_lm_run[0], tmp_path, dirs_exist_ok=True)
  os.remove(tmp_path / "config.json")  # a workdir from before config.json was written
  config = tiny_config(stdlib_data_dir)
  config.model.d_model = 64
  with pytest.raises(ckpt_lib.CheckpointError, match="nothing was moved"):
    run(config, tmp_path)
  assert saved_steps(tmp_path) == [4, 8]
  assert not os.path.exists(tmp_path / "unreadable_checkpoints")
