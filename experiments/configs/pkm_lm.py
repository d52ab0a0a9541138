"""The default LM with a product-key memory in place of the middle layer's dense FFN.

Command:
  python -m experiments.train --config=experiments/configs/pkm_lm.py --workdir=/tmp/pkm_lm

Layers 0 and 2 keep the dense 128 -> 512 -> 128 GELU FFN; layer 1 reads a memory of
N = 128^2 = 16384 slots of width 128 (2.1M value params) with 4 heads x top-16 per token
(Lample et al. 2019, "Large Memory Layers with Product Keys"). Per token the memory costs about
the dense FFN's multiply-adds (query 128x4x128 + sub-key scores 4x2x128x64 + read 4x16x128 =
139k against 2x128x512 = 131k). The value table trains with its own peak learning rate
train.memory_value_learning_rate = 1e-2 (3.3x the others' 3e-3, same schedule): each row is read
by a few tokens per batch, so it sees far fewer updates than a dense weight. Everything else
(data, 400 steps of 32 x 128 bytes, AdamW) is `base.get_config()`.

Measured at 400 steps on a shared 2-core CPU (0.35 steps/s against lm_dense.py's 0.42 in the
same busy window): eval/bpb 2.086 against lm_dense.py's 2.161 at the same step count (2.144 with
--config.train.memory_value_learning_rate=3e-3, i.e. one learning rate for all params), with
about 0.7 of the 16384 slots read per batch of 4096 tokens and 0.80 over the eval window
(eval/layer_1/ffn/memory_usage).

Variants: --config.model.ffn.gated=True (memory+), --config.model.ffn_layers='(0,2)'
--config.model.shared_memory_values=True (one table read by two layers).
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
  c.train.memory_value_learning_rate = 1e-2
  return c
