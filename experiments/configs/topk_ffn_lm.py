"""The default LM with top-k activation FFNs: each token keeps 10 % of every FFN's hidden units.

Command:
  python -m experiments.train --config=experiments/configs/topk_ffn_lm.py --workdir=/tmp/topk_ffn_lm

lm_dense.py's backbone, data and 400 steps of 32 x 128 bytes; every layer's FFN is "topk"
(`sparsejax.activations.TopKFFN`): h = gelu(x W_in), then only the k = 51 of 512 hidden units of
largest |h| per token reach W_out (training takes the dense masked path; decode at <= 16 tokens
reads only those 51 rows of W_out). Logged per layer: ffn/active_fraction (0.0996 = 51 / 512).
Variants: --config.model.ffn.active_fraction=0.25, --config.model.ffn.k=32; the contextual-
sparsity FFN with a trained low-rank predictor is experiments/configs/predicted_ffn_lm.py.

Expected on a 2-core CPU: a train step costs 1.0x lm_dense.py's (measured interleaved, 1.02x on
a shared machine), so about 3 minutes. Measured (`python -m experiments.claims activation_ffn`,
experiments/claims/results/activation_ffn.md, one run): eval/bpb 2.154 against lm_dense.py's
2.143 at equal steps, with 10 % of the hidden units per token.
Makhzani & Frey 2014, "k-Sparse Autoencoders" (top-k activations in the hidden layer).
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.model.ffn = ml_collections.ConfigDict({"name": "topk", "active_fraction": 0.1})
  return c
