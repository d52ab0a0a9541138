"""Sparse Universal Transformer byte LM: one shared MoE block applied up to 4 times, with halting.

Command:
  python -m experiments.train --config=experiments/configs/sut_lm.py --workdir=/tmp/sut_lm

The embedding, head and block of moe_lm.py (width 128, 4 heads, 8 SwiGLU experts of hidden 256,
top-2), but ONE block shared by every step (`sparsejax.models.universal`, architecture
"universal"), applied up to L = num_layers = 4 times. Each token halts by stick-breaking: after
each step a gate gives alpha = P(halt now); the next state is the halting-weighted mixture of the
states so far, and the ACT ponder loss 1e-3 * E[depth] is added. A token is frozen once its
remaining mass is below 1e-3. Logged: halting/expected_depth, halting/compute_fraction (the
token-steps a skipping implementation would run), per-step expert load (layer_l/ffn/...).
Variants: --config.model.architecture.halting=False (fixed depth, a plain sparse UT),
--config.model.architecture.ponder_weight=1e-2 (shallower), --config.model.attention.name=
head_routed (routed attention heads in the shared block).

Measured (one run, 100 steps: --config.train.num_steps=100 --config.train.eval_every=100, on
a shared 2-core CPU at load average 12-19: 8 min 45 s wall, 1 min 42 s of CPU): eval/bpb 3.193,
against 3.125 for lm_dense.py and 2.966 for moe_lm.py at the same 100 steps (same machine);
expected depth fell from 1.9 at step 25 to 1.19 at step 100, compute_fraction 0.85. The full
400 steps should take about 5-7 minutes on an idle 2-core CPU (not measured).
"""
import ml_collections

from experiments.configs import moe_lm


def get_config() -> ml_collections.ConfigDict:
  c = moe_lm.get_config()
  c.model.num_layers = 4
  c.model.architecture = ml_collections.ConfigDict({
      "name": "universal", "halting": True, "halt_threshold": 0.999, "ponder_weight": 1e-3})
  return c
