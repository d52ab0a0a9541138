"""Default job: a 3-layer, 128-wide byte-level Transformer LM on the embedded stdlib corpus.

Command:
  python -m experiments.train --config=experiments/configs/lm_dense.py --workdir=/tmp/lm_dense

Expected on a 2-core CPU: 400 steps of 32x128 bytes in about 3 minutes (2.2-2.9 steps/s),
reaching eval/bpb of about 2.14 (measured 2.143 at step 400, twice; 2.161, and 1.958 with
--config.train.num_steps=600, with the batch order before the Grain input). For scale, on the train split (Python 3.11.7): unigram entropy
4.66 bits/byte, gzip -9 of the concatenated files 1.82 bits/byte.
"""
from experiments.configs import base


def get_config():
  return base.get_config()
