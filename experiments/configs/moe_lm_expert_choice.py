"""Expert-choice MoE byte LM: each of 8 experts takes its top-C tokens of the batch.

Command:
  python -m experiments.train --config=experiments/configs/moe_lm_expert_choice.py --workdir=/tmp/moe_ec

moe_lm.py with router "expert_choice" (Zhou et al., 2022): capacity C = T * k * cf / E with
k = 2, cf = 1, so loads are balanced by construction and a token may get 0..E experts (logged
as coverage and experts_per_token). Caveat for decoders: an expert's choice among the tokens
of a batch depends on later tokens, so training sees a mild future-token leak that inference
cannot reproduce; use it to study routing, not as a deployable LM.

Expected on a 2-core CPU: 400 steps in about moe_lm.py's time; measured eval/bpb 2.020 (moe_lm.py
1.974, lm_dense.py 2.161), max/mean expert load 1 by construction, about 99.7 % of tokens
covered by at least one expert.
"""
from experiments.configs import moe_lm


def get_config():
  c = moe_lm.get_config()
  c.model.ffn.router = "expert_choice"
  c.model.ffn.router_kwargs = {"capacity_factor": 1.0}
  c.model.ffn.load_balance_weight = 0.0
  return c
