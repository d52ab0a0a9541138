"""Training runs of the byte LM for claims: one run per (arm, seed), exactly as the trainer runs
`python -m experiments.train --config=... --config.seed=SEED`, each in its own scratch workdir.

`SMALL` shrinks the default LM so that a claim can afford three seeds of several arms on a
2-core CPU (about 30 s per 300-step run); `FAST` shrinks it to a smoke test of two steps.
"""
import contextlib
import os
import tempfile
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from experiments import metrics
from experiments import trainer

# 2 blocks of width 64 over 64-byte windows, batches of 16, 300 steps: what the LM claims run.
SMALL = {"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 256,
         "model.max_len": 64, "train.seq_len": 64, "train.batch_size": 16, "train.num_steps": 300,
         "train.warmup_steps": 30, "train.eval_every": 100, "train.log_every": 50,
         "train.eval_batches": 8}
# A smoke test: one block of width 32, two steps of 4 windows of 32 bytes, one eval batch.
FAST = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.d_ff": 64,
        "model.max_len": 32, "train.seq_len": 32, "train.batch_size": 4, "train.num_steps": 2,
        "train.warmup_steps": 1, "train.eval_every": 2, "train.log_every": 1,
        "train.eval_batches": 1}
WINDOWS_128 = {"model.max_len": 128, "train.seq_len": 128}  # FAST sizes over the default windows
# The FAST-sized default LM: its 3 blocks and 128-byte windows (the TidalDecode plan of
# decode_budget needs 3 layers, the probes of lm_neurons read layer_1).
FAST_DEFAULT_LM = {**WINDOWS_128, "model.num_layers": 3}
_QUIET = {"checkpoint.every": 10**6, "train.plot_expert_load": False}
DEFAULT_LM_WORKDIR = "/tmp/sparsejax_lm"  # the quickstart's workdir
DEFAULT_LM_CONFIG = "experiments/configs/lm_dense.py"


def configure(config: ml_collections.ConfigDict, seed: int, fast: bool,
              overrides: dict[str, Any] | None = None,
              fast_overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`config` with `seed`, `overrides` (flattened keys), no intermediate checkpoints and, when
  `fast`, the FAST sizes and then `fast_overrides` on top (`model.ffn` / `model.attention`
  settings are kept)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.seed = seed
  fast_keys = {**FAST, **(fast_overrides or {})} if fast else {}
  config.update_from_flattened_dict({**_QUIET, **(overrides or {}), **fast_keys})
  return config


def last_metrics(records: Sequence[dict], layer_metrics: Sequence[str] = ()) -> dict[str, Any]:
  """eval_bpb and step of the last eval record, train_loss of the last train record, and for
  each name in `layer_metrics` the mean over layers of `train/layer_*/NAME` in that record."""
  final_eval = [r for r in records if "eval/bpb" in r][-1]
  final_train = [r for r in records if "train/loss" in r][-1]
  row = {"eval_bpb": float(final_eval["eval/bpb"]), "steps": int(final_eval["step"]),
         "train_loss": float(final_train["train/loss"])}
  for name in layer_metrics:
    values = [v for k, v in final_train.items()
              if k.startswith("train/layer_") and k.endswith("/" + name)]
    row[name] = float(np.mean(values)) if values else None
  return row


def train_run(config: ml_collections.ConfigDict, workdir: str,
              layer_metrics: Sequence[str] = ()) -> dict[str, Any]:
  """Trains `config` in `workdir`; `last_metrics` plus the wall seconds."""
  start = time.perf_counter()
  trainer.train(config, workdir)
  wall_s = round(time.perf_counter() - start, 1)
  return {**last_metrics(metrics.read_metrics(workdir), layer_metrics), "wall_s": wall_s}


def train_arms(arms: Sequence[tuple[str, Callable[[], ml_collections.ConfigDict]]],
               seeds: Sequence[int], fast: bool, overrides: dict[str, Any] | None = None,
               layer_metrics: Sequence[str] = (),
               fast_overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """One row {"arm", "seed", eval_bpb, ...} per (arm, seed): arm = (name, config factory), each
  trained with `configure(factory(), seed, fast, overrides, fast_overrides)` in a scratch
  workdir."""
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds:
      for name, factory in arms:
        config = configure(factory(), seed, fast, overrides, fast_overrides)
        row = train_run(config, os.path.join(scratch, f"{name}_{seed}"), layer_metrics)
        rows.append({"arm": name, "seed": seed, **row})
        print(f"{name} seed {seed}: eval bpb {row['eval_bpb']:.4f} ({row['wall_s']} s)",
              flush=True)
  return rows


@contextlib.contextmanager
def default_lm(fast: bool):
  """Yields the workdir of a finished default LM run: the quickstart's DEFAULT_LM_WORKDIR (which
  `experiments.tasks.sae.load_lm` trains first when it is missing), or with `fast` a 2-step run
  of the FAST-sized LM with the default's 3 blocks and 128-byte windows (`FAST_DEFAULT_LM`)
  trained in a scratch workdir."""
  if not fast:
    yield DEFAULT_LM_WORKDIR
    return
  from experiments.configs import lm_dense  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    config = configure(lm_dense.get_config(), 0, True, fast_overrides=FAST_DEFAULT_LM)
    trainer.train(config, workdir)
    yield workdir
