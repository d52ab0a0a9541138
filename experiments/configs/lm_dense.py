"""Default job: a 3-layer, 128-wide byte-level Transformer LM on the embedded stdlib corpus.

Command:
  python -m experiments.train --config=experiments/configs/lm_dense.py --workdir=/tmp/lm_dense

Expected on a 2-core CPU: 600 steps of 32x128 bytes in about 3 minutes, reaching
eval/bpb of about 2.4 (see README for the measured figure).
"""
from experiments.configs import base


def get_config():
  return base.get_config()
