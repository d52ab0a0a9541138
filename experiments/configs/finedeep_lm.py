"""Finedeep byte LM: each FFN split into 2 stacked sub-layers of 4 fine-grained experts, all on.

Command:
  python -m experiments.train --config=experiments/configs/finedeep_lm.py --workdir=/tmp/finedeep_lm

lm_dense.py's model (3 layers, width 128) with each GELU FFN of hidden 512 replaced by
`sparsejax.moe.finedeep` ("finedeep"): M = 2 sub-layers x K = 4 experts of hidden 512 / 8 = 64,
each sub-layer an RMSNorm, its 4 experts on every token, output-guided sigmoid gates normalised
over the sub-layer's experts, and a residual (Pan et al., 2025). Same FFN parameter count as
lm_dense.py plus 2 x 128 router and 2 x 128 norm weights per layer, and the same FFN matmul
FLOPs but for the 4-wide gate reductions. Logs per layer the gate entropy (log 4 = 1.386 when
uniform, the start), the mean largest gate and each expert's mean gate.

Expected on a 2-core CPU: 400 steps in about 3 minutes (2.2-3.0 steps/s, as lm_dense.py; the
layer's fwd+bwd is about 1.2x a dense FFN's). Measured (seed 0, 400 steps, 145 s wall on the
idle machine): eval/bpb 2.216, behind lm_dense.py's 2.143 at the same step count (the paper's
gains are at 100B-token scale); the gates move off uniform (entropy 1.386 -> 1.261).
"""
import ml_collections

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict({
      "name": "finedeep",
      "num_sublayers": 2,
      "experts_per_sublayer": 4,
      "expert": "ffn",
  })
  return c
