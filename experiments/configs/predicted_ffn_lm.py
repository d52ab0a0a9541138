"""The default LM with predicted (Deja Vu) sparse FFNs: a low-rank predictor picks 10 % of units.

Command:
  python -m experiments.train --config=experiments/configs/predicted_ffn_lm.py \
    --workdir=/tmp/predicted_ffn_lm

lm_dense.py's backbone, data and 400 steps of 32 x 128 bytes; every layer's FFN is "predicted"
(`sparsejax.activations.PredictedFFN`): a rank-32 predictor (x A) B scores the 512 hidden units
and only its top k = 51 per token reach W_out. The predictor trains jointly with the LM, against
the true top-51 of |gelu(x W_in)| (binary cross-entropy on stop-gradient targets, aux loss
"predictor", which reaches only A and B), scaled by predictor_coeff = 0.01: AdamW's updates
barely depend on a gradient's scale, so the predictor learns about as fast as at 1.0, while its
share of the global norm that train.grad_clip = 1.0 clips becomes negligible (at init, with
1.0, the predictor's gradients have norm 0.19 beside the LM's 0.80). Logged per layer:
ffn/predictor (0.01 x the BCE), ffn/recall (the fraction of the true top-k the predictor picks),
ffn/active_fraction (0.0996). Measured in a 60-step run (layer mean): recall 0.10 at step 10,
0.19 at 30, 0.47 at 60 (random choice: 0.0996; --config.train.num_steps=60: eval/bpb 3.74).
Decode at <= 16 tokens reads only the 51 predicted columns of W_in and rows of W_out.
Variants: --config.model.ffn.rank=64, --config.model.ffn.active_fraction=0.25.

Expected on a 2-core CPU: a train step costs about 1.45x lm_dense.py's (measured interleaved on
a shared machine: the predictor, two top-k and the BCE over 4096 x 512 units per layer), so
about 4-5 minutes. Measured (`python -m experiments.claims activation_ffn`,
experiments/claims/results/activation_ffn.md, one run): eval/bpb 2.331 against lm_dense.py's
2.143 and the exact top-k FFN's 2.154 at equal steps; predictor recall 0.69 at the end.
Liu et al. 2023, "Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time"; Khaki et
al. 2025, "SparseLoRA" (predictor trained jointly).
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict(
      {"name": "predicted", "active_fraction": 0.1, "rank": 32, "predictor_coeff": 0.01})
  return c
