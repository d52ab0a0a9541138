"""The LM claims moe_lm_flops, upcycling and pkm_vs_dense: FLOP counts, tables and verdicts on
hand-made payloads (no training)."""
import ml_collections

from experiments.claims import moe_lm_flops
from experiments.claims import pkm_vs_dense
from experiments.claims import upcycling


def _model(d_model, d_ff, **ffn):
  return ml_collections.ConfigDict({"d_model": d_model, "d_ff": d_ff, "ffn": ffn})


def test_active_ffn_flops_hand_counts():
  # Dense GELU 64 -> 256 -> 64: 2 * 64 * 256 multiply-adds, 2 FLOPs each.
  assert moe_lm_flops.active_ffn_flops(_model(64, 256, name="dense")) == 65_536
  # Top-1 of 8 GELU experts of 256: the same plus a 64 x 8 router.
  top1 = _model(64, 256, name="moe", k=1, num_experts=8, expert="ffn")
  assert moe_lm_flops.active_ffn_flops(top1) == 2 * (32_768 + 512)
  # Top-2 of 8 SwiGLU experts of 256 at width 128 (moe_lm.py): 2 * 3 * 128 * 256 + 128 * 8.
  swiglu = _model(128, 256, name="moe", k=2, num_experts=8, expert="swiglu")
  assert moe_lm_flops.active_ffn_flops(swiglu) == 2 * (196_608 + 1_024)
  # Hash top-1: no router.
  hashed = _model(64, 256, name="hash_moe", num_experts=8, expert="ffn")
  assert moe_lm_flops.active_ffn_flops(hashed) == 65_536
  # Soft MoE, 8 one-slot experts of 32 per token: 8 * 2 * 64 * 32 + 3 * 64 * 8.
  soft = _model(64, 32, name="soft_moe", num_experts=8, slots_per_expert=1, expert="ffn",
                token_group_size=1)
  assert moe_lm_flops.active_ffn_flops(soft) == 2 * (32_768 + 1_536)
  # Shared FFN of 192 + top-2 rank-8 adapters on in and out: 2*64*192 + 64*8 + 2*2*8*(64+192).
  lora = _model(64, 192, name="lora_moe", num_experts=8, k=2, rank=8, targets=("in", "out"),
                expert="ffn")
  assert moe_lm_flops.active_ffn_flops(lora) == 2 * (24_576 + 512 + 8_192)


def test_arms_at_small_size_have_equal_ffn_flops():
  flops = {}
  for name, factory, fraction in moe_lm_flops.ARMS:
    config = moe_lm_flops.small_config(factory, 0, False, moe_lm_flops.scale_width(fraction))
    flops[name] = moe_lm_flops.active_ffn_flops(config.model)
  assert flops == {"dense": 65_536, "top1_gelu": 66_560, "top2_gelu": 66_560}


def test_pkm_macs_hand_count_matches_the_small_ffn():
  # query 64 x (4 x 56) + sub-keys 4 x 2 x 64 x 28 + read 4 x 16 x 64 = 14336 + 14336 + 4096.
  assert pkm_vs_dense.pkm_macs(64, 4, 56, 64, 16) == 32_768
  config = moe_lm_flops.small_config(pkm_vs_dense.small_pkm, 0, False,
                                     pkm_vs_dense.in_last_block)
  assert tuple(config.model.ffn_layers) == (1,)
  assert pkm_vs_dense.ffn_flops(config.model) == 65_536


def _rows(bpb_by_arm, **extra):
  return [{"arm": arm, "seed": seed, "eval_bpb": bpb, **extra.get(arm, {})}
          for arm, values in bpb_by_arm.items() for seed, bpb in enumerate(values)]


def _moe_payload(dense, top1, top2):
  extra = {"dense": {"d_ff": 256, "ffn_flops": 65_536, "load_max_over_mean": None},
           "top1_gelu": {"d_ff": 256, "ffn_flops": 66_560, "load_max_over_mean": 1.5},
           "top2_gelu": {"d_ff": 128, "ffn_flops": 66_560, "load_max_over_mean": 1.2}}
  return {"runs": _rows({"dense": dense, "top1_gelu": top1, "top2_gelu": top2}, **extra)}


def test_moe_lm_flops_judge_and_table():
  yes = _moe_payload([3.10, 3.11, 3.12], [3.00, 3.01, 3.02], [3.03, 3.04, 3.05])
  assert moe_lm_flops.judge(yes)[0] == "yes"
  # top-1's mean is lower but its worst seed (3.115) is above dense's best (3.10): inside.
  partly = _moe_payload([3.10, 3.11, 3.12], [3.09, 3.10, 3.115], [3.13, 3.14, 3.15])
  reproduced, verdict = moe_lm_flops.judge(partly)
  assert reproduced == "partly" and "top1_gelu 3.102 ± 0.013 (inside)" in verdict
  no = _moe_payload([3.00, 3.01, 3.02], [3.10, 3.11, 3.12], [3.05, 3.06, 3.07])
  assert moe_lm_flops.judge(no)[0] == "no"
  table = moe_lm_flops.table(yes)
  assert "| `dense` | 256 | 65,536 (1.000x) | 3.110 ± 0.010 | - |" in table
  assert "| `top2_gelu` | 128 | 66,560 (1.016x) | 3.040 ± 0.010 | 1.20 ± 0.00 |" in table


def _upcycling_payload(upcycled, dense_continued, scratch):
  steps = {"dense_pretrained": 300, "upcycled": 600, "dense_continued": 600, "moe_scratch": 300}
  extra = {arm: {"total_steps": s, "ffn_flops": 1, "load_max_over_mean": None}
           for arm, s in steps.items()}
  return {"runs": _rows({"dense_pretrained": [3.1, 3.1, 3.1], "upcycled": upcycled,
                         "dense_continued": dense_continued, "moe_scratch": scratch}, **extra)}


def test_upcycling_judge_and_table():
  yes = _upcycling_payload([2.80, 2.81, 2.82], [2.85, 2.86, 2.87], [3.00, 3.01, 3.02])
  assert upcycling.judge(yes)[0] == "yes"
  no = _upcycling_payload([2.90, 2.91, 2.92], [2.85, 2.86, 2.87], [2.80, 2.81, 2.82])
  reproduced, verdict = upcycling.judge(no)
  assert reproduced == "no" and "dense_continued 2.860 ± 0.010 (no)" in verdict
  assert "| `upcycled` | 600 | 1 | 2.810 ± 0.010 | - |" in upcycling.table(yes)


def _pkm_payload(dense, pkm):
  extra = {"dense": {"slots": None, "value_lr": None, "ffn_flops": 65_536,
                     "memory_usage": None, "access_entropy": None},
           "pkm": {"slots": 4096, "value_lr": 0.01, "ffn_flops": 65_536,
                   "memory_usage": 0.5, "access_entropy": 0.9}}
  return {"runs": _rows({"dense": dense, "pkm": pkm}, **extra)}


def test_pkm_vs_dense_judge_and_table():
  yes = _pkm_payload([3.10, 3.11, 3.12], [3.00, 3.01, 3.02])
  assert pkm_vs_dense.judge(yes)[0] == "yes"
  assert pkm_vs_dense.judge(_pkm_payload([3.10, 3.11, 3.12], [3.05, 3.11, 3.13]))[0] == "partly"
  assert pkm_vs_dense.judge(_pkm_payload([3.00, 3.01, 3.02], [3.10, 3.11, 3.12]))[0] == "no"
  assert ("| `pkm` | 4,096 | 0.01 | 65,536 | 3.010 ± 0.010 | 0.50 ± 0.00 | 0.90 ± 0.00 |"
          in pkm_vs_dense.table(yes))
