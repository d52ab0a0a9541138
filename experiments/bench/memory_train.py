"""Trainer step of a product-key memory model with row-sparse values, at 128^2 vs 1024^2 slots.

`python -m experiments.bench memory_train [--json FILE] [--quick]`

The `pkm_train_step_N{N}` cases of the `memory` benchmark alone (see experiments/bench/memory.py
for what a step does): `experiments.trainer.make_train_step` with config.train.memory_values =
"sparse", i.e. forward, backward with the value table's gradient in row form and a lazy
row-wise AdamW update of only the rows read, timed interleaved. Target: the 1024^2 step <= 2x
the 128^2 step (`vs_smallest_N`).
"""
from typing import Any

from experiments.bench import memory

DESCRIPTION = "product-key memory train step (sparse value optimizer) at 128^2 vs 1024^2 slots"
BASELINE = "pkm_train_step_N16384"
# Columns of the README table (experiments/claims/readme.py): {row key: header}.
README_COLUMNS = {"us_per_token": "µs per token", "vs_smallest_N": "time vs its smallest N",
                  "dense_over_sparse": "dense / sparse values"}


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The `memory` benchmark's train-step rows only."""
  return memory.run_train(repeats, quick)
