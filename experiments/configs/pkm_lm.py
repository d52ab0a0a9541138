"""The default LM with a product-key memory in place of the middle layer's dense FFN.

Command:
  python -m experiments.train --config=experiments/configs/pkm_lm.py --workdir=/tmp/pkm_lm

Layers 0 and 2 keep the dense 128 -> 512 -> 128 GELU FFN; layer 1 reads a memory of
N = 128^2 = 16384 slots of width 128 (2.1M value params) with 4 heads x top-16 per token
(Lample et al. 2019, "Large Memory Layers with Product Keys"). Everything else (data, 400 steps
of 32 x 128 bytes, AdamW with one learning rate for all params) is `base.get_config()`.

Expected on a 2-core CPU: about 1.3x the wall time of `lm_dense.py`. Measured with
--config.train.num_steps=600 (both runs sharing the same 2 busy cores: 17 min against 13 min):
eval/bpb 1.966 against lm_dense.py's 1.958 at the same step count, so no gain at this scale, with
train/layer_1/ffn/memory_usage about 0.67 of the 16384 slots read per batch of 4096 tokens.
The value table trains with the same learning rate as the rest unless
--config.train.memory_value_learning_rate=... gives it its own (same schedule, scaled).

The "pkm" layer is registered when `sparsejax.memory` is imported (`import sparsejax` does it).
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict({
      "name": "pkm",
      "num_keys": 128,
      "k": 16,
      "num_heads": 4,
      "d_key": 128,
      "query_norm": "layernorm",
      "gated": False,
  })
  c.model.ffn_layers = (1,)
  return c
