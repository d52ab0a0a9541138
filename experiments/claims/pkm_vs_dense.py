"""Claim: a product-key memory in place of an FFN, at equal multiply-adds per token, improves an LM.

  python -m experiments.claims pkm_vs_dense [--seeds 3] [--fast]

`configs/pkm_lm.py` scaled to `lm_runs.SMALL` (2 blocks of width D=64, 300 steps of 16 x 64
bytes): the last block's GELU FFN (64 -> 256 -> 64, 32,768 multiply-adds per token) becomes a
memory of 64^2 = 4,096 value rows of width 64 read by 4 heads x top-16 with 56-dim queries,
whose multiply-adds per token (`pkm_macs`: query 64 x 4 x 56, sub-key scores 4 x 2 x 64 x 28,
read 4 x 16 x 64) are exactly the FFN's. Arms: the dense LM, and the memory LM with the value
table's own peak learning rate 1e-2 (pkm_lm.py's, 3.3x the others' 3e-3). The table gives
eval bits per byte and the memory's slot usage and access entropy on the last logged training
batch (1,024 tokens). A full run (2 arms x 3 seeds of 300 steps) takes about 3 minutes of CPU
time on 2 cores;
`--fast` runs 2 steps of a 1-block width-32 model, dense and memory, on the first seed only.
"""
import os
import tempfile
from typing import Sequence

import ml_collections

from experiments import claims
from experiments.claims import moe_lm_flops
from experiments.configs import lm_dense
from experiments.configs import pkm_lm

USAGE, ENTROPY = "memory_usage", "access_entropy"


def small_pkm() -> ml_collections.ConfigDict:
  """pkm_lm.py with a 64^2-slot memory, 56-dim queries: the SMALL FFN's multiply-adds."""
  c = pkm_lm.get_config()
  c.model.ffn.num_keys = 64
  c.model.ffn.d_key = 56
  return c


def in_last_block(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The memory in the last block (the other blocks keep the dense FFN)."""
  config.model.ffn_layers = (config.model.num_layers - 1,)
  return config


ARMS = (("dense", lm_dense.get_config, None), ("pkm", small_pkm, in_last_block))


def pkm_macs(d_model: int, num_heads: int, d_key: int, num_keys: int, k: int) -> int:
  """Multiply-adds per token of a product-key memory read: D H Q + H 2 P Q/2 + H k D.

  Query projection D -> H x Q, each head's scores against the P sub-keys of both halves
  (Q/2 each), and the weighted sum of k value rows of width D per head (Lample et al. 2019).
  """
  return d_model * num_heads * d_key + num_heads * num_keys * d_key + num_heads * k * d_model


def ffn_flops(model: ml_collections.ConfigDict) -> int:
  """Forward FLOPs (2 per multiply-add) per token of `model.ffn` (a memory or a dense FFN)."""
  ffn = model.ffn
  if ffn.name == "pkm":
    return 2 * pkm_macs(model.d_model, ffn.num_heads, ffn.d_key, ffn.num_keys, ffn.k)
  return moe_lm_flops.active_ffn_flops(model)


def run(seeds: Sequence[int], fast: bool) -> dict:
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds[:1] if fast else seeds:
      for name, factory, finish in ARMS:
        config = moe_lm_flops.small_config(factory, seed, fast, finish)
        row = moe_lm_flops.train_row(name, seed, config, os.path.join(scratch, f"{name}_{seed}"),
                                     (USAGE, ENTROPY), ffn_flops)
        value_lr = config.train.memory_value_learning_rate
        rows.append({**row, "value_lr": value_lr if name != "dense" else None,
                     "slots": config.model.ffn.num_keys**2 if name != "dense" else None})
  return {"runs": rows}


def table(payload: dict) -> str:
  runs = payload["runs"]
  bpb = claims.group(runs, "arm", "eval_bpb")
  usage, entropy = claims.group(runs, "arm", USAGE), claims.group(runs, "arm", ENTROPY)
  first = {}
  for r in runs:
    first.setdefault(r["arm"], r)
  rows = [[f"`{arm}`", "-" if first[arm]["slots"] is None else f"{first[arm]['slots']:,}",
           "-" if first[arm]["value_lr"] is None else f"{first[arm]['value_lr']:g}",
           f"{first[arm]['ffn_flops']:,}", claims.fmt(bpb[arm]), moe_lm_flops._cell(usage[arm]),
           moe_lm_flops._cell(entropy[arm])] for arm in bpb]
  return claims.markdown_table(
      ["arm", "memory slots", "value lr", "last block's FFN FLOPs / token", "eval bpb",
       "slot usage (train batch)", "access entropy / log N"], rows)


def judge(payload: dict) -> tuple[str, str]:
  """The memory LM (own value learning rate) below the dense LM: yes if by more than the seed
  spread, partly if only its mean is lower."""
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  mean = {arm: claims.mean_std(v) for arm, v in bpb.items()}
  check = moe_lm_flops.compare(bpb["pkm"], bpb["dense"])
  reproduced = {"clear": "yes", "inside": "partly", "no": "no"}[check]
  return reproduced, (
      f"Eval bpb with the memory {mean['pkm'][0]:.3f} ± {mean['pkm'][1]:.3f} against dense "
      f"{mean['dense'][0]:.3f} ± {mean['dense'][1]:.3f} at equal multiply-adds ({check}: "
      f"clear when every memory seed is below every dense seed).")


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, claims.group(payload["runs"], "arm", "eval_bpb"), "eval bits/byte",
                  "product-key memory vs dense FFN: eval bpb per seed")


CLAIM = claims.Claim(
    name="pkm_vs_dense",
    title="Product-key memory LM vs dense",
    source="Lample et al., 2019, \"Large Memory Layers with Product Keys\"",
    statement="Replacing a Transformer FFN by a product-key memory layer with about the same "
              "compute per token lowers the LM's perplexity, the memory adding many parameters "
              "at little cost.",
    setup="The byte LM at the claims' small size (2 pre-LN blocks of width 64, 300 AdamW steps "
          "of 16 x 64 bytes of the embedded stdlib corpus, eval on its validation files), dense, "
          "or with the last block's GELU FFN replaced by a product-key memory of 64^2 slots "
          "(4 heads x top-16, 56-dim LayerNorm'd queries) of exactly the FFN's multiply-adds per "
          "token, its value table trained at a 3.3x peak learning rate as in pkm_lm.py.",
    expected="the memory LM (own value learning rate) below the dense LM's eval bpb by more than "
             "the seed spread",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=3)
