"""`sparse_lm.py` with block-sparse FFN kernels trained through the block-sparse kernel (BSR).

Command:
  python -m experiments.train --config=experiments/configs/sparse_lm_block.py \
      --workdir=/tmp/sparse_lm_block

Every FFN kernel (`layer_*/ffn/wi` [128, 512], `wo` [512, 128]) keeps 25 % of its 32x32 blocks
(16 of 64), the density of `sparse_lm.py`, as BSR params (`sparsejax.masks.bsr`: the kept
blocks' values and a slot map; checkpoints hold only these), and runs
`kernels.block_sparse` in forward and backward. RigL on block scores (drop the least
||block||_2, grow the largest dense-gradient block norm) swaps a cosine-decaying fraction (0.3
at the start) of each kernel's blocks every 50 steps until step 300, as `sparse_lm.py` does
for single weights. `--config.sparsity.updater.name=set` grows at random instead.

Measured on the idle 2-core machine (2026-12-03, each config run twice, one run at a time):
eval/bpb 2.384 at step 400 in 128 s / 130 s wall; `sparse_lm.py` (masked dense, same density)
2.389 in 142 s / 141 s. In the last 100-step windows this run made 3.55-3.63 steps/s and
`sparse_lm.py` 3.15-3.31: about 1.1x at this width (32x32 blocks of a 128 x 512 kernel,
where the block loop's overhead is a large share); at width the step is 0.52x dense
(`python -m experiments.bench sparse_train`). Earlier runs at load average 21-24 inverted the
ratio (0.52 vs 0.88 steps/s), as timings under load do.
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict(
      {"name": "block_sparse", "block": (32, 32), "density": 0.25})
  c.sparsity.updater = ml_collections.ConfigDict({"name": "rigl"})
  c.sparsity.schedule = ml_collections.ConfigDict(
      {"name": "cosine", "drop_fraction": 0.3, "end": 300, "update_every": 50})
  return c
