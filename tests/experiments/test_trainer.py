"""The trainer: metrics, exact resume, mesh equivalence, clean stops and clear errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from experiments import metrics as metrics_lib
from experiments import train as train_cli
from experiments import trainer as trainer_lib
from experiments.configs import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir, **train):
  c = base.get_config()
  c.data.data_dir = data_dir
  c.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32)
  c.train.update(num_steps=8, batch_size=8, seq_len=32, log_every=2, eval_every=4,
                 eval_batches=2, warmup_steps=2)
  c.train.update(train)
  c.checkpoint.every = 4
  c.mesh.data = 1
  return c


def run(config, workdir, devices=1, stop_at_step=None):
  """(summary, final params as numpy) of one trainer run on the first `devices` devices."""
  t = trainer_lib.Trainer(config, str(workdir), jax.devices()[:devices])
  try:
    summary = t.run(stop_at_step)
    return summary, jax.device_get(t.state["params"])
  finally:
    t.close()


def assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())


def saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(workdir))}


def test_train_logs_metrics_and_saves_checkpoints(tiny_lm_run):
  workdir, summary, _ = tiny_lm_run
  records = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  for r in records:
    for key in ("train/loss", "steps_per_sec", "tokens_per_sec", "train/learning_rate"):
      assert math.isfinite(r[key]), key
    assert r["tokens_per_sec"] == pytest.approx(r["steps_per_sec"] * 8 * 32)
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  for r in evals:
    assert r["eval/bpb"] == pytest.approx(r["eval/loss"] / math.log(2))
  assert records[0]["train/loss"] < math.log(258) + 1.0  # unit-variance logits at init: ~ln V + 1/2
  assert records[-1]["train/loss"] < records[0]["train/loss"]
  assert summary["step"] == 8
  assert saved_steps(workdir) == [4, 8]


def test_resume_is_exact(stdlib_data_dir, tmp_path, tiny_lm_run):
  full_workdir, full_summary, full_params = tiny_lm_run
  config = tiny_config(stdlib_data_dir)
  run(config, tmp_path / "split", stop_at_step=3)  # pre-empted between checkpoints
  resumed_summary, resumed_params = run(config, tmp_path / "split")
  assert_trees_close(resumed_params, full_params, rtol=1e-6)
  assert resumed_summary["train/loss"] == pytest.approx(full_summary["train/loss"], rel=1e-6)
  assert losses(tmp_path / "split")[8] == pytest.approx(losses(full_workdir)[8], rel=1e-6)


def test_sharded_mesh_matches_single_device(stdlib_data_dir, tmp_path):
  # The programs of tiny_config's runs (log_every does not change them): compiled once.
  config = tiny_config(stdlib_data_dir, log_every=1)
  run(config, tmp_path / "one")
  sharded = tiny_config(stdlib_data_dir, log_every=1)
  sharded.mesh.update(data=2, fsdp=2, model=2)
  run(sharded, tmp_path / "eight", devices=8)
  one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
  assert sorted(one) == list(range(1, 9))
  for step in one:
    assert eight[step] == pytest.approx(one[step], rel=1e-4), step


def test_checkpoint_restores_on_another_mesh(stdlib_data_dir, tmp_path, tiny_lm_run):
  sharded = tiny_config(stdlib_data_dir)
  sharded.mesh.update(data=2, fsdp=2, model=2)
  run(sharded, tmp_path / "moved", devices=8, stop_at_step=4)
  _, moved_params = run(tiny_config(stdlib_data_dir), tmp_path / "moved")
  assert_trees_close(moved_params, tiny_lm_run[2], rtol=1e-4)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(stdlib_data_dir, tmp_path):
  config = tiny_config(stdlib_data_dir)
  config.checkpoint.every = 2
  run(config, tmp_path, stop_at_step=4)
  config.train.learning_rate = float("nan")
  with pytest.raises(trainer_lib.NonFiniteLossError, match=r"before step 6.*checkpoint: step 4"):
    run(config, tmp_path)
  assert saved_steps(tmp_path) == [2, 4]
  config.train.learning_rate = 3e-3
  summary, params = run(config, tmp_path)  # the kept checkpoint still resumes
  assert summary["step"] == 8
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.train.__setattr__("batch_sizes", 4), "unknown config key 'train.batch_sizes'"),
        (lambda c: c.mesh.update(data=3), "mesh"),
        (lambda c: c.mesh.update(data=-1, model=-1), "-1"),
        (lambda c: c.update({"extra": 1}), "unknown config key 'extra'"),
        (lambda c: c.train.update(seq_len=64), "seq_len=64 exceeds config.model.max_len=32"),
        (lambda c: c.model.ffn.update(name="nope"), "nope"),
    ],
)
def test_bad_config_is_a_clear_error(stdlib_data_dir, tmp_path, mutate, message):
  config = tiny_config(stdlib_data_dir)
  config.mesh.data = -1  # valid on the 8 test devices unless `mutate` breaks it
  mutate(config)
  with pytest.raises(trainer_lib.ConfigError, match=message):
    trainer_lib.Trainer(config, str(tmp_path), jax.devices())


def test_batch_not_divisible_by_data_parallel_size(stdlib_data_dir, tmp_path):
  config = tiny_config(stdlib_data_dir, batch_size=6)
  config.mesh.update(data=4, fsdp=2)
  with pytest.raises(trainer_lib.ConfigError, match="batch_size=6 is not divisible.*8"):
    trainer_lib.Trainer(config, str(tmp_path), jax.devices())


def test_unwritable_workdir(stdlib_data_dir, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(trainer_lib.ConfigError, match="is not a writable directory"):
    trainer_lib.Trainer(tiny_config(stdlib_data_dir), str(tmp_path / "file" / "run"))


def cli_environment() -> dict[str, str]:
  """This environment for a `python -m experiments.train` subprocess: one CPU device (no fake
  devices), and conftest.py's quick-compile XLA flags and compilation cache."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def _cli(data_dir, workdir, *overrides):
  args = [
      sys.executable, "-m", "experiments.train", "--config=experiments/configs/lm_dense.py",
      f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.model.d_model=32",
      "--config.model.num_layers=1", "--config.model.max_len=32", "--config.train.seq_len=32",
      "--config.train.batch_size=4", "--config.train.eval_batches=1", *overrides,
  ]
  return subprocess.Popen(args, cwd=REPO, env=cli_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.train.batch_sizes=3"], "error: unknown config key 'train.batch_sizes'"),
        (["--config.mesh.data=2"], "error: config.mesh"),
        (["--config.train.num_steps=x"], "error: flag --config.train.num_steps=x"),
    ],
)
def test_cli_errors_are_one_line(stdlib_data_dir, tmp_path, overrides, message):
  proc = _cli(stdlib_data_dir, tmp_path, *overrides)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 1
  assert stderr.strip().splitlines()[-1].startswith(message), stderr
  assert "Traceback" not in stderr


def test_sigterm_saves_a_checkpoint_and_exits_as_preempted(stdlib_data_dir, tmp_path):
  proc = _cli(stdlib_data_dir, tmp_path, "--config.train.num_steps=100000",
              "--config.train.log_every=1", "--config.checkpoint.every=100000")
  deadline = time.time() + 120
  while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None:
    assert time.time() < deadline, "training never logged a step"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == train_cli.EXIT_PREEMPTED, stderr
  saved = saved_steps(tmp_path)
  assert len(saved) == 1 and saved[0] >= 1
  assert f"preempted at step {saved[0]} (checkpoint saved)" in stdout
  last_logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"]
  assert saved[0] >= last_logged


def tiny_moe_config(data_dir, **ffn):
  c = tiny_config(data_dir)
  c.model.ffn = ml_collections.ConfigDict(
      {"name": "moe", "num_experts": 4, "k": 2, "capacity_factor": None, "implementation": "reference", **ffn})
  return c


def test_moe_trains_logs_expert_load_and_plots(stdlib_data_dir, tmp_path):
  run(tiny_moe_config(stdlib_data_dir), tmp_path)
  records = metrics_lib.read_metrics(str(tmp_path))
  last = records[-1]
  for layer in (0, 1):
    load = np.array(last[f"train/layer_{layer}/ffn/expert_load_E"])
    assert load.shape == (4,) and load.sum() == pytest.approx(1.0, abs=1e-5)
    assert last[f"train/layer_{layer}/ffn/dropped_fraction"] == 0.0
  aux_losses = sum(v for k, v in last.items() if k.endswith(("/load_balance", "/router_z")))
  assert last["train/total_loss"] == pytest.approx(last["train/loss"] + aux_losses, rel=1e-5)
  assert sorted(os.listdir(tmp_path / "plots")) == ["expert_load_0000004.png",
                                                    "expert_load_0000008.png"]


def test_router_state_is_trained_checkpointed_and_resumed(stdlib_data_dir, tmp_path):
  config = tiny_moe_config(stdlib_data_dir, bias_update_rate=1e-2)
  config.train.update(num_steps=4, eval_every=4)
  config.checkpoint.every = 2
  t = trainer_lib.Trainer(config, str(tmp_path / "full"), jax.devices()[:1])
  t.run()
  full_state = jax.device_get(t.state)
  t.close()
  biases = jax.tree.leaves(full_state["model_state"])
  assert len(biases) == 2 and all(np.abs(b).max() > 0 for b in biases)
  run(config, tmp_path / "split", stop_at_step=1)
  t = trainer_lib.Trainer(config, str(tmp_path / "split"), jax.devices()[:1])
  t.run()
  assert_trees_close(jax.device_get(t.state["model_state"]), full_state["model_state"], 1e-6)
  t.close()


@pytest.mark.parametrize(
    "ffn, message",
    [({"k": 5}, "k"), ({"capacity_factor": 0.0}, "capacity_factor"),
     ({"router": "nope"}, "unknown router 'nope'")],
)
def test_bad_router_settings_fail_at_config_time(stdlib_data_dir, tmp_path, ffn, message):
  with pytest.raises(trainer_lib.ConfigError, match=message):
    trainer_lib.Trainer(tiny_moe_config(stdlib_data_dir, **ffn), str(tmp_path), jax.devices()[:1])


def test_init_from_workdir_copies_params_and_resets_the_rest(stdlib_data_dir, tmp_path,
                                                              tiny_lm_run):
  source, _, source_params = tiny_lm_run
  config = tiny_config(stdlib_data_dir)
  config.init.from_workdir = str(source)
  t = trainer_lib.Trainer(config, str(tmp_path / "warm"), jax.devices()[:1])
  state = t.restore_or_init()
  assert t.data.get_state() == t._train_iterator(t.rows).get_state() and int(state["step"]) == 0
  assert_trees_close(jax.device_get(state["params"]), source_params, rtol=0)
  mu = jax.tree.leaves(jax.device_get(state["opt_state"][1][0].mu))
  assert all(np.all(m == 0) for m in mu)  # fresh Adam moments
  t.close()


def test_init_from_workdir_errors(stdlib_data_dir, tmp_path, tiny_lm_run):
  config = tiny_config(stdlib_data_dir)
  config.init.from_workdir = str(tmp_path / "empty")
  with pytest.raises(trainer_lib.ConfigError, match="holds no checkpoint"):
    trainer_lib.Trainer(config, str(tmp_path / "a"), jax.devices()[:1])
  config = tiny_config(stdlib_data_dir)
  config.model.d_ff = 48
  config.init.from_workdir = str(tiny_lm_run[0])
  with pytest.raises(trainer_lib.ConfigError, match=r"has shape \(32, 64\), this model needs \(32, 48\)"):
    trainer_lib.Trainer(config, str(tmp_path / "b"), jax.devices()[:1])


def test_memory_values_get_their_own_learning_rate(stdlib_data_dir, tmp_path):
  def values_update(value_lr):
    config = tiny_config(stdlib_data_dir, num_steps=2, log_every=1, eval_every=2)
    config.model.ffn = ml_collections.ConfigDict(
        {"name": "pkm", "num_keys": 8, "k": 4, "num_heads": 1, "d_key": 16})
    config.train.memory_value_learning_rate = value_lr
    t = trainer_lib.Trainer(config, str(tmp_path / str(value_lr)), jax.devices()[:1])
    before = jax.device_get(t.init_state()["params"])
    t.run()
    after = jax.device_get(t.state["params"])
    t.close()
    delta = lambda name: np.abs(after["layer_0"]["ffn"][name] - before["layer_0"]["ffn"][name]).max()
    return delta("values"), delta("subkeys")

  base_values, base_keys = values_update(None)
  fast_values, fast_keys = values_update(0.03)  # 10x the base learning rate
  assert fast_values == pytest.approx(10 * base_values, rel=0.05)  # Adam: step ~ lr
  assert fast_keys == pytest.approx(base_keys, rel=1e-5)


def test_optimizer_moments_are_sharded_like_their_params(stdlib_data_dir, tmp_path):
  config = tiny_config(stdlib_data_dir)
  config.mesh.update(data=2, fsdp=2, model=2)
  t = trainer_lib.Trainer(config, str(tmp_path), jax.devices())
  params = t.state_shardings["params"]
  adam = t.state_shardings["opt_state"][1][0]
  assert params["embed"]["embedding"].spec == jax.sharding.PartitionSpec("model", "fsdp")
  for moments in (adam.mu, adam.nu):
    assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, params)
  assert adam.count.spec == jax.sharding.PartitionSpec()
  t.close()


def test_upcycled_moe_starts_with_the_dense_models_eval_loss(stdlib_data_dir, tmp_path,
                                                              tiny_lm_run):
  dense_workdir, dense_eval, _ = tiny_lm_run  # its summary holds the eval of its final state
  config = tiny_moe_config(stdlib_data_dir, expert="ffn", router_kwargs={"renormalize": True})
  config.init.update(from_workdir=str(dense_workdir), upcycle=True)
  t = trainer_lib.Trainer(config, str(tmp_path / "moe"), jax.devices()[:1])
  moe_eval = t.evaluate(t.restore_or_init())
  t.close()
  assert moe_eval["eval/loss"] == pytest.approx(dense_eval["eval/loss"], rel=1e-5)
