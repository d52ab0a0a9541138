"""The default LM (`lm_dense.py`) with sparse FFN kernels trained by RigL; attention, embeddings
and norms stay dense.

Command:
  python -m experiments.train --config=experiments/configs/sparse_lm.py --workdir=/tmp/sparse_lm

Every FFN kernel (`layer_*/ffn/wi`, `wo`) is masked to 25 % density (ERK over those kernels,
75 % sparse); RigL swaps a cosine-decaying fraction (0.3 at the start) of each kernel's kept
weights every 50 steps until step 300. `density/global` and `density/layer_*/ffn/*` are
logged. Switch the method with e.g. `--config.sparsity.updater.name=set`, or to 2:4 N:M with
SR-STE via `--config.sparsity.rules` (a rule `(r"/ffn/w", "nm:n=2,m=4")`) and
`--config.sparsity.updater.name=nm_srste --config.sparsity.schedule.name=none`.

Measured: eval/bpb 2.376 at step 400 (dense `lm_dense.py`: 2.161), density/global exactly 0.25
throughout; 12 minutes wall on the shared 2-core machine while it was heavily loaded (0.5-0.95
steps/s; the dense default runs 2.7-2.9 steps/s on it unloaded).
"""
import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.sparsity.enabled = True
  c.sparsity.density = 0.25
  c.sparsity.distribution = "erk"
  c.sparsity.rules = ((r"/ffn/w", "unstructured"), (r".", "dense"))
  c.sparsity.updater = ml_collections.ConfigDict({"name": "rigl"})
  c.sparsity.schedule = ml_collections.ConfigDict(
      {"name": "cosine", "drop_fraction": 0.3, "end": 300, "update_every": 50})
  return c
