"""Soft MoE byte LM: 4 SwiGLU experts, one slot each, per-token groups (causal-safe).

Command:
  python -m experiments.train --config=experiments/configs/moe_lm_soft.py --workdir=/tmp/moe_soft

Soft MoE (Puigcerver et al., 2024) mixes a group of tokens into each slot; in a causal
decoder a group larger than one token would let a token see later ones, so this config sets
token_group_size=1 (the layer refuses causal use otherwise). With one token per group every
expert sees every token: 4 experts of hidden 128 cost what lm_dense.py's hidden-512 FFN costs,
and the learned slot and combine weights act as a soft, input-dependent mixture.

Expected: 400 steps, measured eval/bpb 2.066 (lm_dense.py 2.161; 4 hidden-128 SwiGLU experts
are 0.75x the dense FFN's FLOPs). Wall time was not measured on an idle machine (17 min at
nice 19 on a loaded one; the per-token mixing of every expert makes it slower than moe_lm.py).
"""
import ml_collections

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict({
      "name": "soft_moe",
      "num_experts": 4,
      "slots_per_expert": 1,
      "expert": "swiglu",
      "causal": True,
      "token_group_size": 1,
  })
  c.model.d_ff = 128
  return c
