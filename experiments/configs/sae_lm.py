"""A TopK sparse autoencoder on the default LM's middle residual stream (after block 1 of 3).

Command:
  python -m experiments.train --config=experiments/configs/sae_lm.py --workdir=/tmp/sae_lm

The LM comes from --config.sae.lm_workdir (default /tmp/sparsejax_lm, the README quickstart's):
a finished run there is loaded; otherwise experiments/configs/lm_dense.py is trained there
first (about 3 minutes on a 2-core CPU). Then 2^18 activations of "layer_1/resid_post" are
harvested and a 2048-latent TopK SAE (k=16, AuxK dead-latent loss) trains on them. Other
architectures: --config.sae.dictionary.kind=batchtopk; kind=relu with
--config.sae.dictionary.l1_coeff=0.03; kind=jumprelu with l0_coeff=0.01, bandwidth=0.05,
init_threshold=1.0 (the settings of experiments/claims/sae_lm.py); a transcoder of block 1's
FFN: --config.sae.sites=layer_1/ffn/in --config.sae.target_sites=layer_1/ffn/out.

Expected on a 2-core CPU: after the LM, about 20 s of harvesting and 2 min of SAE training
(9-16 steps/s on the shared machine), ending at eval/fvu 0.049, eval/l0 16, eval/dead_fraction
0.03 and eval/ce_recovered 0.990 (CE 1.582 with the SAE spliced in, against 1.541 clean and
5.553 with the site zero-ablated); measured three times (twice by `python -m
experiments.claims sae_lm`). `python -m experiments.export_sae --workdir=/tmp/sae_lm --out=DIR`
writes the trained SAE in SAELens's layout.
"""
from experiments.configs import base


def get_config():
  c = base.get_config()
  c.task = "sae"
  c.sae.sites = "layer_1/resid_post"
  # A latent is dead (and AuxK reconstructs the residual with it) after 2^17 tokens without firing.
  c.sae.dictionary = {"kind": "topk", "num_latents": 2048, "k": 16, "dead_after_tokens": 2**17}
  c.train.num_steps = 1000
  c.train.batch_size = 1024
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.eval_every = 250
  c.train.eval_batches = 8
  c.checkpoint.every = 250
  return c
