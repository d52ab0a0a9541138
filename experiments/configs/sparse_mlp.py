"""LeNet-300-100 on scikit-learn's 8x8 digits with sparse training: dense, static, SET, RigL, SRigL.

Command (the method is the config argument; default "rigl"; 90 % sparsity, ERK over the layers):
  python -m experiments.train --config=experiments/configs/sparse_mlp.py:rigl --workdir=/tmp/sparse_mlp
  python -m experiments.train --config=experiments/configs/sparse_mlp.py:dense --workdir=/tmp/dense_mlp
  ... --config.sparsity.density=0.02   (98 % sparsity)
  ... --config.data.name=mnist [--config.data.data_dir=DIR]   (any TFDS image classification
      dataset, prepared once with `tfds build mnist --file_format=array_record`; see
      experiments/data/images.py)

Methods: "dense" (no mask), "static" (a fixed random ERK mask), "set" (magnitude drop, random
regrowth), "rigl" (magnitude drop, gradient regrowth), "srigl" (RigL at constant fan-in per
output neuron, with neuron ablation). Dynamic methods swap a cosine-decaying fraction (0.3 at
the start) of each layer's kept weights every 50 steps until 75 % of training.

Expected on a 2-core CPU: 1500 steps of 64 images in under a minute (most of it start-up and
compilation); eval/accuracy (359 test images) 0.989 dense, 0.975 for RigL at 90 % sparsity and
0.950 at 98 % (seed 0). The mean ± std over 3 seeds of every method at 90 % and 98 % sparsity,
`python -m experiments.claims sparse_mlp`, is in the README's Results section.
"""
import ml_collections

from experiments.configs import base

METHODS = ("dense", "static", "set", "rigl", "srigl")
NUM_STEPS = 1500


def get_config(method: str = "rigl") -> ml_collections.ConfigDict:
  if method not in METHODS:
    raise ValueError(f"sparse_mlp method={method!r}; allowed: {', '.join(METHODS)}")
  c = base.get_config()
  c.task = "classify"
  c.data.name = "digits"
  c.data.eval_split = "test"
  c.classifier = ml_collections.ConfigDict({"name": "lenet_300_100"})
  c.train.update(num_steps=NUM_STEPS, batch_size=64, learning_rate=3e-3, warmup_steps=50,
                 weight_decay=1e-4, log_every=100, eval_every=500)
  c.checkpoint.every = NUM_STEPS

  c.sparsity.enabled = method != "dense"
  c.sparsity.density = 0.1
  c.sparsity.distribution = "erk"
  if method == "srigl":
    c.sparsity.rules = ((r"kernel$", "fan_in"),)
  if method in ("set", "rigl", "srigl"):
    c.sparsity.updater = ml_collections.ConfigDict({"name": method})
    c.sparsity.schedule = ml_collections.ConfigDict(
        {"name": "cosine", "drop_fraction": 0.3, "end": int(0.75 * NUM_STEPS), "update_every": 50})
  return c
