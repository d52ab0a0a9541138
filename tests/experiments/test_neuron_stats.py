"""`python -m experiments.neuron_stats` end to end on a tiny LM, checked against a direct count."""
import json

import jax
import numpy as np
import pytest

from experiments import checkpoints as ckpt_lib
from experiments import data as data_lib
from experiments import neuron_stats
from sparsejax import models
from sparsejax import sites
from sparsejax.activations import stats
from tests.experiments.test_trainer import run
from tests.experiments.test_trainer import tiny_config


def test_neuron_stats_writes_per_layer_statistics_of_the_lm(stdlib_data_dir, tmp_path, capsys):
  config = tiny_config(stdlib_data_dir, num_steps=2, eval_every=2, log_every=2)
  config.checkpoint.every = 2
  run(config, tmp_path / "lm")
  out = tmp_path / "stats"
  assert neuron_stats.main(["--lm_workdir", str(tmp_path / "lm"), "--workdir", str(out),
                            "--windows", "6", "--batch_size", "4", "--position_buckets", "4",
                            "--top_k", "2", "--top_neurons", "3"]) == 0
  assert "layer_1/ffn/hidden" in capsys.readouterr().out
  summary = json.loads((out / "neuron_stats.json").read_text())
  assert list(summary) == ["layer_0/ffn/hidden", "layer_1/ffn/hidden"]
  # The firing counts, recomputed from the checkpoint on the same 6 evenly spaced windows.
  lm = models.build_lm(config.model, vocab_size=data_lib.VOCAB_SIZE)
  params = ckpt_lib.Checkpoints(str(tmp_path / "lm"), read_only=True).restore_params(2)
  split = data_lib.load_windows("python_stdlib", "validation", 32, data_dir=stdlib_data_dir)
  inputs_BT = np.stack([split[int(i)]["inputs"] for i in np.arange(6) * len(split) // 6])
  _, captured = jax.jit(lambda x: sites.collect(lm, {"params": params}, x,
                                                sites="layer_*/ffn/hidden"))(inputs_BT)
  real_T = inputs_BT.ravel() != data_lib.PAD_ID
  for site, h_BTF in captured.items():
    h_TF = np.asarray(h_BTF).reshape(-1, 64)[real_T]
    fired_F = (h_TF > 0.01).sum(0)
    s = summary[site]
    assert s["tokens"] == real_T.sum() and s["num_neurons"] == 64
    assert s["firing_fraction"] == pytest.approx(fired_F.mean() / real_T.sum(), rel=1e-6)
    assert s["dead"] == int((fired_F == 0).sum())
    assert s["near_zero_fraction"] == pytest.approx((np.abs(h_TF) <= 0.01).mean(), rel=1e-6)
    assert len(s["top_token"]) == 3 and s["windows"] == 6
    neuron, contexts = next(iter(s["contexts"].items()))
    assert contexts[0]["act"] == np.float32(h_TF[:, int(neuron)].max())
    assert contexts[0]["text"].endswith("]]")
  assert neuron_stats._snippet(np.array([104, 105, 257, 0xC3, 0xA9, 33, 256]), 5) == (
      "hi<eos>\u00e9[[!]]")
  loaded = stats.load_stats(str(out / "neuron_stats"))
  assert float(loaded["layer_0/ffn/hidden"].tokens) == real_T.sum()
