"""The digits CNN with a class-constrained MoE in its last block, for expert specialisation.

Command:
  python -m experiments.train --config=experiments/configs/moe_cnn_constrained.py --workdir=/tmp/cnn_constrained
  python -m experiments.expert_specialisation --workdir=/tmp/cnn_constrained

moe_cnn.py's `sparsejax.models.SmallCNN` on scikit-learn's 8x8 digits (3x3 stem to 16 channels,
two blocks x + FFN(LN(dwconv_3x3 x)), mean pool, linear head). Block 0's FFN is dense; block 1's
is "class_constrained_moe" (`sparsejax.moe.class_constrained`): 5 GELU experts 16 -> 32 -> 16,
top-1, dropless, routed per image (mean logits of its 64 positions), expert e assigned the
digits e and e + 5. While training, an image of digit c may only go to expert c mod 5 (the
"classify" task passes the labels) and the router learns that choice from the "class_routing"
loss (weight 1); at test time the router is free. The second command writes the class x expert
routing frequency on the test split as a heatmap (workdir/expert_specialisation.png) and JSON,
with the fraction of test positions the free router sends to their class's expert.

Expected on a 2-core CPU: 800 steps of 32 images in 1-2 minutes through the trainer (a good
part of it compilation). Measured (seed 0, 2 cores shared with other jobs: 2 min 13 s, the same
numbers on a rerun): eval/accuracy 0.953 on the 359 test digits (0.903 at step 400; with 400
steps in all, 0.797), and the free router sends 0.955 of the test positions (class-averaged)
to their class's expert (routing_frequency in workdir/expert_specialisation.json). For
comparison moe_cnn.py's dense / top_k arms reach 0.955 / 0.975 in 400 steps.
"""
import ml_collections

from experiments.configs import base

NUM_STEPS = 800
NUM_CLASSES = 10
NUM_EXPERTS = 5


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.task = "classify"
  c.data.name = "digits"
  c.data.eval_split = "test"
  c.classifier = ml_collections.ConfigDict({
      "name": "small_cnn", "channels": 16, "num_blocks": 2, "d_ff": 32, "kernel_size": 3,
      "image_shape": (8, 8, 1), "ffn": "class_constrained_moe", "ffn_blocks": (1,),
      "ffn_kwargs": {"num_experts": NUM_EXPERTS, "k": 1, "expert": "ffn",
                     "num_classes": NUM_CLASSES, "experts_per_class": 1}})
  c.train.update(num_steps=NUM_STEPS, batch_size=32, learning_rate=3e-3, warmup_steps=40,
                 weight_decay=1e-4, log_every=100, eval_every=400)
  c.checkpoint.every = NUM_STEPS
  return c
