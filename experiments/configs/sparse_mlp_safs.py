"""LeNet-300-100 on digits, sparse (RigL, 90 %), with SAFS activations α_l · op_l(β_l · x).

Command (the argument names the two hidden layers' operators, comma-separated, from
`sparsejax.masks.safs.UNARY_OPERATORS`; default "relu,relu"):
  python -m experiments.train --config=experiments/configs/sparse_mlp_safs.py:swish,tanh --workdir=/tmp/safs_mlp
  ... --config.classifier.learn_scale=False   (SAFS stage 1: α = β = 1)
  ... --config.sparsity.density=0.02          (98 % sparsity)

`sparse_mlp.py:rigl` with the classifier "safs_mlp": the operators are SAFS stage 1's choice
(`safs.lahc_search` over short runs), α and β (one pair per hidden layer, initialised to 1,
never masked) are learned with the weights (stage 2) and logged as train/act_l/alpha, /beta.

Expected on a 2-core CPU: 1500 steps in about a minute, as `sparse_mlp.py`. Measured (seed 0,
one run each): eval/accuracy 0.9805 for "relu,selu" (the operators `python -m
experiments.sparse_nas ... --safs_steps 12` picked at 95 % sparsity) and 0.9749 for "relu,relu"
with learned scales, against 0.975 for plain `sparse_mlp.py:rigl`; one seed, so within noise.
"""
import ml_collections

from experiments.configs import sparse_mlp
from sparsejax.masks import safs


def get_config(operators: str = "relu,relu") -> ml_collections.ConfigDict:
  ops = tuple(op.strip() for op in operators.split(","))
  for op in ops:
    safs.UNARY_OPERATORS.get(op)
  if len(ops) != 2:
    raise ValueError(f"sparse_mlp_safs operators={operators!r}: give two, one per hidden layer")
  c = sparse_mlp.get_config("rigl")
  c.classifier = ml_collections.ConfigDict({"name": "safs_mlp", "hidden": (300, 100),
                                            "activations": ops, "learn_scale": True})
  return c
