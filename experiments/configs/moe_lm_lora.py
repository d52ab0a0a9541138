"""Mixture-of-LoRA-experts byte LM on the embedded corpus: one shared FFN + 8 routed adapters.

Command:
  python -m experiments.train --config=experiments/configs/moe_lm_lora.py --workdir=/tmp/moe_lm_lora

Same backbone as lm_dense.py (3 layers, width 128). Every FFN is lm_dense.py's GELU FFN (hidden
512, params named as DenseFFN's), shared by all tokens, plus 8 rank-8 LoRA experts on its
input and output projections; each token takes k=2 of them (softmax-then-top-k, renormalised
gates, Switch load-balance loss 1e-2, z-loss 1e-3) and adds their gate-weighted low-rank
updates (`sparsejax.moe.lora_experts`; MoLoRA / LLaVA-MoLE / PESC). Adapters and router add
83k params per layer to the FFN's 131k, and ~16% to its per-token matmul FLOPs. B starts at
0, so at step 0 each FFN computes its shared dense FFN.
Trained here from scratch with every param trainable; the PESC / MoLE recipe (dense checkpoint,
then only adapters and routers) is `lora_experts.load_dense_ffn` + `make_adapter_optimizer` in
your own loop. Logs per-expert load, router entropy and z-loss; expert-load heatmap per eval.

Expected on a 2-core CPU: 400 steps in about 3.5 minutes (2.4 steps/s), eval/bpb about 2.11
(measured 2.114; lm_dense.py 2.161 at the same step count), max/mean adapter load about 1.16.
"""
import ml_collections

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict({
      "name": "lora_moe",
      "num_experts": 8,
      "k": 2,
      "rank": 8,
      "targets": ("in", "out"),
      "expert": "ffn",
      "router": "top_k",
      "router_kwargs": {"order": "softmax_then_topk", "renormalize": True},
      "load_balance_weight": 1e-2,
      "z_loss_weight": 1e-3,
  })
  return c
