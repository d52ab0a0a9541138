r"""Sparse upcycling: the trained dense byte LM of lm_dense.py turned into a top-2 MoE LM.

Commands (train the dense model, then continue it as an MoE from its last checkpoint):
  python -m experiments.train --config=experiments/configs/lm_dense.py --workdir=DIR_DENSE
  python -m experiments.train --config=experiments/configs/moe_lm_upcycle.py \
      --workdir=DIR_UPCYCLED --config.init.from_workdir=DIR_DENSE

Every block's FFN becomes 8 experts, each a copy of the dense GELU FFN of that block (hidden
512, so expert="ffn" and d_ff equal to lm_dense.py's), with a zero-initialised router and
renormalised top-2 gates: at step 0 the MoE LM computes exactly the dense LM's function, and
training lets the experts diverge (Komatsuzaki et al., 2023, "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints"). Optimizer state and the schedule start afresh.
Compare eval/bpb against continuing the dense run for as many steps. Expected on a 2-core CPU:
the step-0 eval/bpb equals the dense run's last one (tested); a full 400-step upcycled run takes
about moe_lm.py's time (~3.5 min, 8 GELU experts of hidden 512, so twice moe_lm.py's expert
FLOPs). Measured: the 400-step dense run (2.161) continued 400 steps as this MoE reaches eval/bpb
1.847, against 1.907 for the same dense run continued 400 steps as a dense model
(lm_dense.py with --config.init.from_workdir=DIR_DENSE).
"""
from experiments.configs import base
from experiments.configs import moe_lm


def get_config():
  c = moe_lm.get_config()
  c.model.ffn.expert = "ffn"  # the dense model's GELU FFN
  c.model.d_ff = base.get_config().model.d_ff
  c.init.upcycle = True
  return c
