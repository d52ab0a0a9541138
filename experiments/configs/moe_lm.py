"""Top-2 dropless MoE byte LM on the embedded corpus: 8 SwiGLU experts in every layer.

Command:
  python -m experiments.train --config=experiments/configs/moe_lm.py --workdir=/tmp/moe_lm

Same backbone as lm_dense.py (3 layers, width 128); each token runs k=2 experts of hidden 256,
i.e. the dense model's active hidden width (SwiGLU's gate makes it 1.5x the dense GELU
FFN's active FLOPs) with 8x its FFN parameters. Router: softmax-then-top-k
with renormalised gates, Switch load-balance loss 1e-2 and z-loss 1e-3. Logs per-expert load,
dropped fraction, router entropy and z-loss, and writes an expert-load heatmap PNG per eval to
DIR/plots. Variants: `--config.model.ffn.router=expert_choice`, `--config.model.ffn.capacity_factor=1.25`
(token dropping), or the configs moe_lm_expert_choice.py and moe_lm_soft.py.

Expected on a 2-core CPU: 400 steps in about 3.5 minutes (2 steps/s), eval/bpb about 1.97
(measured 1.974; lm_dense.py 2.161 at the same step count), max/mean expert load about 1.25.
"""
import ml_collections
from ml_collections import config_dict

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict({
      "name": "moe",
      "num_experts": 8,
      "k": 2,
      "router": "top_k",
      "router_kwargs": {"order": "softmax_then_topk", "renormalize": True},
      "capacity_factor": None,
      "expert": "swiglu",
      "load_balance_weight": 1e-2,
      "z_loss_weight": 1e-3,
      # Expert parallelism (used when --config.mesh.expert > 1; see sparsejax/moe/parallel.py).
      "expert_parallel": "auto",
      "ep_buffer_factor": config_dict.placeholder(float),  # None: worst-case, never drops
      "ep_num_chunks": 1,
      "ep_exchange": "all_to_all",
  })
  c.model.d_ff = 256
  return c
