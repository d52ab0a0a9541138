"""The pkm_lm config: valid for the trainer, memory in the middle layer, trains end to end."""
import math

import jax
import numpy as np

import sparsejax.memory  # noqa: F401 (registers "pkm")
from experiments import metrics as metrics_lib
from experiments import run_config
from experiments import tasks
from experiments import trainer as trainer_lib
from experiments.configs import pkm_lm
from sparsejax.models import build_lm

MEMORY_METRICS = ("memory_usage", "access_entropy", "top_slot_share")


def test_config_puts_the_memory_in_the_middle_layer():
  config = pkm_lm.get_config()
  run_config.check_config(config, tasks.TASKS)
  tasks.TASKS.get(config.task).check_config(config)
  model = build_lm(config.model, vocab_size=258)
  tokens = jax.ShapeDtypeStruct((1, config.train.seq_len), np.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  assert params["layer_1"]["ffn"]["values"].value.shape == (128**2, config.model.d_model)
  for layer in ("layer_0", "layer_2"):
    assert set(params[layer]["ffn"]) == {"wi", "wo"}, layer


def small_config(data_dir):
  config = pkm_lm.get_config()
  config.data.data_dir = data_dir
  config.model.update(d_model=32, num_heads=2, d_ff=64, max_len=32)
  config.model.ffn.update(num_keys=16, k=4, num_heads=2, d_key=16)
  config.train.update(num_steps=50, batch_size=8, seq_len=32, log_every=10, eval_every=50,
                      eval_batches=1, warmup_steps=5)
  config.checkpoint.every = 50
  config.mesh.data = 1
  return config


def test_trains_end_to_end_with_the_trainer(stdlib_data_dir, tmp_path):
  trainer = trainer_lib.Trainer(small_config(stdlib_data_dir), str(tmp_path), jax.devices()[:1])
  try:
    summary = trainer.run()
  finally:
    trainer.close()
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
  assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.3
  assert math.isfinite(summary["eval/bpb"])
  for name in MEMORY_METRICS:
    value = summary[f"train/layer_1/ffn/{name}"]
    assert 0 < value <= 1, name
    # Accumulated over the whole eval window: at least the usage of one eval batch.
    assert 0 < records[-1][f"eval/layer_1/ffn/{name}"] <= 1, name
  top_slots = records[-1]["eval/layer_1/ffn/top_slots"]
  assert len(top_slots) == 8 and all(0 <= s < 16**2 for s in top_slots)
