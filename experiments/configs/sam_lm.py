"""The default LM with its FFN and attention kernels 90 % sparse, trained by AdamW + SAM-ON.

Command:
  python -m experiments.train --config=experiments/configs/sam_lm.py --workdir=/tmp/sam_lm

Every FFN and attention kernel (`layer_*/ffn/wi`, `wo`, `layer_*/attention/wq`, `wk`, `wv`,
`wo`) is masked to 10 % density (ERK over those kernels, random static mask); embeddings and
norms stay dense. Each step the optimizer gets the gradient at w + eps, eps = rho g_S / |g_S| on
the normalisation-layer scales S only (SAM-ON, `config.train.sam_rho` = 0.5, `sam_rule` the
default ".*norm.*"): Mueller et al. (2023), "Normalization Layers Are All That
Sharpness-Aware Minimization Needs". The loss logged is the loss at w. Plain AdamW:
`--config.train.sam_rho=0`; SAM on every weight (the kept ones only, pruned weights stay 0):
`--config.train.sam_rule='.*' --config.train.sam_rho=0.05`.

Each step evaluates the gradient twice. Measured: eval/bpb 2.725 at step 400; 400 steps of
32 x 128 bytes took 20 minutes of wall time (5.7 CPU-minutes) on the 2-core CPU shared with
other jobs at load 15-23 (0.26 steps/s under that load, 2.1 steps/s once it eased), so about
5 minutes on an idle one. The claim `python -m experiments.claims sam_on_norm` compares the
arms at the small LM's size (there SAM-ON did not beat plain AdamW).
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.sparsity.enabled = True
  c.sparsity.density = 0.1
  c.sparsity.distribution = "erk"
  c.sparsity.rules = ((r"/(ffn|attention)/w", "unstructured"), (r".", "dense"))
  c.sparsity.init = "random"
  c.sparsity.updater = ml_collections.ConfigDict({"name": "static"})
  c.sparsity.schedule = ml_collections.ConfigDict({"name": "none"})
  c.train.sam_rho = 0.5
  return c
