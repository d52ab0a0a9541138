"""The digits CNN with its pointwise FFN as dense, token-choice, expert-choice or Soft MoE.

Command (the FFN is the config argument; default "soft_moe"):
  python -m experiments.train --config=experiments/configs/moe_cnn.py:soft_moe --workdir=/tmp/cnn_soft
  python -m experiments.train --config=experiments/configs/moe_cnn.py:top_k --workdir=/tmp/cnn_tc

`sparsejax.models.SmallCNN` ("small_cnn") on scikit-learn's 8x8 digits read as 8x8x1 images:
a 3x3 conv stem to 16 channels, two blocks x + FFN(LN(dwconv_3x3 x)), mean pool, linear head.
The FFN of both blocks is, per arm, at equal FFN compute per image (64 positions per image,
each expert and the dense FFN a GELU FFN 16 -> 32 -> 16):
  "dense": one FFN on every position;
  "top_k": token choice, each position to its top-1 of 8 experts, capacity factor 1 (Switch);
  "expert_choice": each of 8 experts takes its top C = T / 8 positions of the batch (Zhou et
    al., 2022), on average one expert per position;
  "soft_moe": 8 experts x 8 slots = 64 slots per image, each a softmax mix of the image's 64
    positions (Puigcerver et al., 2024), non-causal.

Expected on a 2-core CPU: 400 steps of 32 images in about a minute through the trainer (most of
it compilation). Measured by `python -m experiments.claims soft_moe_cnn` (3 seeds, test
accuracy in experiments/claims/results/soft_moe_cnn.json): dense 95.5 %, top_k 97.5 %,
expert_choice 98.1 %, soft_moe 92.4 %.
"""
import ml_collections

from experiments.configs import base

ARMS = ("dense", "top_k", "expert_choice", "soft_moe")
NUM_STEPS = 400
NUM_EXPERTS = 8
CHANNELS = 16
D_FF = 32
POSITIONS = 64  # an 8x8 image's positions: the tokens of one Soft MoE group


def ffn_config(arm: str) -> dict:
  """The blocks' FFN name and arguments for `arm`, at one expert's compute per position."""
  if arm == "dense":
    return {"ffn": "dense", "ffn_kwargs": {}}
  if arm == "soft_moe":
    return {"ffn": "soft_moe", "ffn_kwargs": {
        "num_experts": NUM_EXPERTS, "slots_per_expert": POSITIONS // NUM_EXPERTS,
        "expert": "ffn", "causal": False}}
  routed = {"num_experts": NUM_EXPERTS, "k": 1, "expert": "ffn", "capacity_factor": 1.0}
  if arm == "top_k":
    return {"ffn": "moe", "ffn_kwargs": {**routed, "router": "top_k"}}
  return {"ffn": "moe", "ffn_kwargs": {**routed, "router": "expert_choice",
                                       "router_kwargs": {"capacity_factor": 1.0}}}


def get_config(arm: str = "soft_moe") -> ml_collections.ConfigDict:
  if arm not in ARMS:
    raise ValueError(f"moe_cnn arm={arm!r}; allowed: {', '.join(ARMS)}")
  c = base.get_config()
  c.task = "classify"
  c.data.name = "digits"
  c.data.eval_split = "test"
  c.classifier = ml_collections.ConfigDict({
      "name": "small_cnn", "channels": CHANNELS, "num_blocks": 2, "d_ff": D_FF,
      "kernel_size": 3, "image_shape": (8, 8, 1), **ffn_config(arm)})
  c.train.update(num_steps=NUM_STEPS, batch_size=32, learning_rate=3e-3, warmup_steps=40,
                 weight_decay=1e-4, log_every=100, eval_every=200)
  c.checkpoint.every = NUM_STEPS
  return c
