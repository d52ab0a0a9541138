"""The default LM with block-sparse attention: a causal sliding window plus global tokens.

Command:
  python -m experiments.train --config=experiments/configs/sparse_attn_lm.py \
      --workdir=/tmp/sparse_attn_lm

Same backbone, data and 400 steps of 32 x 128 bytes as lm_dense.py; every layer's attention is
`causal() & (sliding_window(32) | global_tokens(16))` (Longformer: each query sees its last 32
keys and the first 16 tokens, which also see everything before them), run by the block-sparse
attention kernel in blocks of 16 (26 of the 36 causal 16 x 16 blocks stored; 41 % of all 64).
Attended fraction (mean over queries of attended / causal keys, logged as
layer_*/attention/attended_fraction): 0.740 at seq_len 128 (0.59 for the window alone).
Variants: --config.model.attention.pattern=window|strided|fixed|bigbird|causal (see
`sparsejax.attention.block_sparse.PATTERNS`).
Measured at 400 steps (one run, `python -m experiments.claims sparse_attention`, on the shared
2-core CPU at load average 12-18): eval/bpb 2.141 against dense attention's 2.143 in the same
sweep (lm_dense.py), 8 min 9 s wall (dense: 12 min 18 s, the load varied; an idle 2-core
CPU runs lm_dense.py in about 3 minutes).
Beltagy et al. 2020, "Longformer: The Long-Document Transformer"; Child et al. 2019.
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.attention = ml_collections.ConfigDict({
      "name": "block_sparse", "pattern": "window_global", "block": 16, "window": 32,
      "num_global": 16})
  return c
