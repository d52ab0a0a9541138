"""The "sae" task end to end on a tiny LM: it finishes the LM first, logs the SAE metrics, caches
activations, trains transcoders, and rejects unusable settings."""
import contextlib
import io
import json
import math

import jax
import numpy as np
import optax
import pytest

from experiments import checkpoints as ckpt_lib
from experiments import data as data_lib
from experiments import export_sae
from experiments import tasks
from experiments import trainer as trainer_lib
from experiments.run_config import ConfigError
from sparsejax import models
from sparsejax.sae import core
from sparsejax.sae import export
from tests.experiments.test_trainer import run
from tests.experiments.test_trainer import tiny_config


@pytest.fixture(scope="module")
def first_sae_run(stdlib_data_dir, tmp_path_factory):
  """A tiny LM run stopped at step 4 of 8, then the default SAE run on it, which must finish the
  LM first: (LM workdir, SAE workdir, SAE summary, SAE params, what the SAE run printed)."""
  lm_workdir = str(tmp_path_factory.mktemp("lm"))
  run(tiny_config(stdlib_data_dir), lm_workdir, stop_at_step=4)
  sae_workdir = tmp_path_factory.mktemp("sae")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    summary, params = run(sae_config(stdlib_data_dir, lm_workdir), sae_workdir)
  return lm_workdir, sae_workdir, summary, params, printed.getvalue()


@pytest.fixture(scope="module")
def lm_workdir(first_sae_run):
  """The tiny LM, finished at step 8 by the first SAE run."""
  return first_sae_run[0]


def sae_config(data_dir, lm_workdir, **sae):
  c = tiny_config(data_dir, num_steps=6, batch_size=64, log_every=3, eval_every=3,
                  eval_batches=2, learning_rate=1e-3, weight_decay=0.0)
  c.task = "sae"
  c.sae.update(lm_workdir=lm_workdir, harvest_tokens=1024, eval_windows=4)
  c.sae.dictionary = {"kind": "topk", "num_latents": 64, "k": 4}
  c.sae.update(sae)
  return c


def records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_sae_task_finishes_the_lm_then_logs_the_sae_metrics(stdlib_data_dir, first_sae_run):
  lm_workdir, sae_workdir, summary, params, printed = first_sae_run
  assert "training the LM" in printed
  assert ckpt_lib.Checkpoints(lm_workdir, read_only=True).latest_step() == 8
  final = records(sae_workdir)[-1]
  for key in ("eval/fvu", "eval/l0", "eval/dead_fraction", "eval/ce_recovered", "train/loss"):
    assert np.isfinite(final[key]), key
  assert 0 < final["eval/l0"] <= 4 and 0 <= final["eval/dead_fraction"] <= 1
  assert final["eval/ce_recovered"] == pytest.approx(
      (final["eval/ce_zero_ablated"] - final["eval/ce_sae"])
      / (final["eval/ce_zero_ablated"] - final["eval/ce_clean"]))
  np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)
  # The clean CE, recomputed here from the LM checkpoint on the same eval windows.
  lm_config = tiny_config(stdlib_data_dir)
  lm = models.build_lm(lm_config.model, vocab_size=data_lib.VOCAB_SIZE)
  lm_params = ckpt_lib.Checkpoints(lm_workdir, read_only=True).restore_params(8)
  windows = data_lib.load_windows("python_stdlib", "validation", 32, data_dir=stdlib_data_dir)
  nll = count = 0.0
  for batch in data_lib.eval_batches(windows, 4, 2):
    logits, _ = lm.apply({"params": lm_params}, batch["inputs"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    nll, count = nll + float(np.sum(losses * batch["weights"])), count + batch["weights"].sum()
  assert final["eval/ce_clean"] == pytest.approx(nll / count, rel=1e-5)
  assert summary["eval/bpb_sae"] == pytest.approx(final["eval/ce_sae"] / math.log(2))


def test_cached_activations_are_read_back_and_train_the_same(stdlib_data_dir, lm_workdir,
                                                             tmp_path, capsys):
  config = sae_config(stdlib_data_dir, lm_workdir, cache_dir=str(tmp_path / "cache"),
                      sites="layer_*/resid_post")
  _, harvested = run(config, tmp_path / "first")
  assert "cached 1,024 activations" in capsys.readouterr().out
  _, cached = run(config, tmp_path / "second")
  assert "read the activations cached" in capsys.readouterr().out
  for a, b in zip(jax.tree.leaves(harvested), jax.tree.leaves(cached), strict=True):
    np.testing.assert_array_equal(a, b)


def test_transcoder_reads_the_ffn_input_and_predicts_its_output(stdlib_data_dir, lm_workdir,
                                                                tmp_path):
  config = sae_config(stdlib_data_dir, lm_workdir, sites="layer_0/ffn/in",
                      target_sites="layer_0/ffn/out")
  config.sae.dictionary.update(kind="relu", skip=True, l1_coeff=0.01)
  _, params = run(config, tmp_path / "transcoder")
  assert params["W_skip"].shape == (32, 32)
  assert np.isfinite(records(tmp_path / "transcoder")[-1]["eval/fvu"])


@pytest.mark.parametrize("change, message", [
    ({"sites": "layer_9/resid_post"}, "layer_9/resid_post"),
    ({"target_sites": "layer_*/ffn/out"}, "one target per input site"),
    ({"harvest_tokens": 10}, "harvest_tokens=10"),
    ({"dictionary": {"kind": "jumprelu", "num_latents": 64}}, "needs l0_coeff > 0"),
])
def test_unusable_sae_settings_are_one_line_errors(stdlib_data_dir, lm_workdir, tmp_path,
                                                   change, message):
  with pytest.raises(ConfigError, match=message) as error:
    trainer_lib.Trainer(sae_config(stdlib_data_dir, lm_workdir, **change), str(tmp_path),
                        jax.devices()[:1])
  assert "\n" not in str(error.value)


def test_export_writes_a_saelens_sae_that_takes_raw_activations(stdlib_data_dir, first_sae_run,
                                                                tmp_path):
  lm_workdir, sae_workdir, _, params, _ = first_sae_run
  config = sae_config(stdlib_data_dir, lm_workdir)
  assert export_sae.main(["--workdir", str(sae_workdir), "--out", str(tmp_path / "out")]) == 0
  loaded, cfg = export.load_saelens(str(tmp_path / "out"))
  assert cfg["architecture"] == "topk" and cfg["k"] == 4
  task = tasks.build_task(config)
  scaled_TD = task.train_source.inputs[:32]
  trained, *_ = core.sae_apply(params, scaled_TD, task.sae_config)
  exported, *_ = core.sae_apply(loaded, scaled_TD / task.input_scale,
                                export.config_from_saelens(cfg))
  np.testing.assert_allclose(exported, trained / task.input_scale, rtol=1e-4, atol=1e-5)
