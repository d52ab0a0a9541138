"""Sparse all-MLP byte LM (sMLP): no attention; token mixing by sMoE, feature mixing by MoE.

Command:
  python -m experiments.train --config=experiments/configs/all_mlp_lm.py --workdir=/tmp/all_mlp_lm

moe_lm.py with every attention replaced by the token-dimension MoE "token_moe"
(`sparsejax.moe.token_moe`): gMLP's gated unit y = (u * mix(RMSNorm(v))) W_out, where the D = 128
features of v are cut into 4 chunks of 32 and chunk h is mixed along the tokens by spatial expert
h (a causal 128 x 128 weight; sMLP's deterministic routing), so no position ever reads a later
one. The FFN is moe_lm.py's token-routed MoE (sMLP's tMoE). Variants:
--config.model.attention.name=token_mlp (one spatial weight, gMLP),
--config.model.attention.router=prefix (learned routing from the first 20 % of tokens: leaks
future tokens into the first positions under the lm task, which trains on every position).

Measured (one run, 100 steps: --config.train.num_steps=100 --config.train.eval_every=100, on
a shared 2-core CPU at load average 12-19: 20 min wall, 1 min 23 s of CPU): eval/bpb 3.345,
against 3.125 for lm_dense.py and 2.966 for moe_lm.py at the same 100 steps (same machine). The
full 400 steps should take about 4-6 minutes on an idle 2-core CPU (not measured).
"""
import ml_collections

from experiments.configs import moe_lm


def get_config() -> ml_collections.ConfigDict:
  c = moe_lm.get_config()
  c.model.attention = ml_collections.ConfigDict({
      "name": "token_moe", "num_experts": 4, "router": "deterministic"})
  return c
