"""Product-key memory train step with the row-sparse value optimizer, at 128^2 and 1024^2 slots.

`python -m experiments.bench memory_train [--json FILE] [--quick]`

The `pkm_train_step_N{N}` cases of the `memory` benchmark alone (see experiments/bench/memory.py
for what a step does): forward, backward and a lazy row-wise AdamW update that touches only the
rows read, timed interleaved. Target: the 1024^2 step <= 2x the 128^2 step (`vs_smallest_N`).
"""
from typing import Any

from experiments.bench import memory

DESCRIPTION = "product-key memory train step (sparse value optimizer) at 128^2 vs 1024^2 slots"
BASELINE = "pkm_train_step_N16384"


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The `memory` benchmark's train-step rows only."""
  return memory.run_train(repeats, quick)
