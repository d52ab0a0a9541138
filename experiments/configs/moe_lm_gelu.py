"""Switch-style top-1 MoE byte LM with GELU experts: the dense LM's active FFN FLOPs, 8x its FFN.

Command:
  python -m experiments.train --config=experiments/configs/moe_lm_gelu.py --workdir=/tmp/moe_gelu

lm_dense.py's backbone (3 layers, width 128) with every FFN replaced by 8 GELU experts of
lm_dense.py's hidden width 512, each token routed to k=1 of them (softmax-then-top-1, gate
p_e not renormalised, so the router learns through the output as in Switch; load-balance loss
1e-2, z-loss 1e-3): per token the experts cost exactly the dense GELU FFN's 4 D F FLOPs, plus
the router's 2 D E (1.6 %). This is the equal-active-FLOPs counterpart of lm_dense.py that
moe_lm.py (SwiGLU experts, 1.5x the FLOPs) is not (Fedus et al., 2021, "Switch Transformers").
Top-2 of 8 at the same FLOPs: --config.model.ffn.k=2 --config.model.d_ff=256
--config.model.ffn.router_kwargs.renormalize=True.

Expected on a 2-core CPU: about moe_lm.py's wall time (~3.5 min for 400 steps). The same
comparison at the claims' small size (2 blocks of width 64, 300 steps, 3 seeds) is
`python -m experiments.claims moe_lm_flops`, results in
experiments/claims/results/moe_lm_flops.md; this full-size config was not run to the end here.
"""
from experiments.configs import base
from experiments.configs import moe_lm


def get_config():
  c = moe_lm.get_config()
  c.model.ffn.expert = "ffn"
  c.model.ffn.k = 1
  c.model.ffn.router_kwargs = {"order": "softmax_then_topk", "renormalize": False}
  c.model.d_ff = base.get_config().model.d_ff
  return c
