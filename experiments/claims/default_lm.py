"""The default job (`experiments/configs/lm_dense.py`) over seeds: the baseline of every LM claim.

  python -m experiments.claims default_lm [--seeds 3] [--fast]

Trains the quickstart's byte LM (3 blocks of width 128, 400 steps of 32 x 128 bytes on the
embedded stdlib corpus) once per seed, exactly as `python -m experiments.train
--config=experiments/configs/lm_dense.py --config.seed=SEED` does, and records eval bits per
byte and wall time (not tabulated: on a shared machine it says more about the load than about
the job). The seed spread is what tells a real difference between
two LM configs from noise. For scale it also measures two compressors of the train split: the
unigram entropy and `gzip -9`.
"""
import gzip
import pathlib
from typing import Sequence

import numpy as np

from experiments import claims
from experiments.claims import lm_runs
from experiments.configs import lm_dense
from experiments.data import stdlib_corpus


SPREAD = 0.01  # bits/byte: "a few thousandths", half the 0.02 tie margin of the LM claims


def train_split_bytes(limit: int | None = None) -> bytes:
  """The concatenated train-split files of the embedded corpus (the first `limit` files)."""
  root = stdlib_corpus.stdlib_root()
  paths = [p for p in stdlib_corpus.list_sources(root) if stdlib_corpus.split_of(p) == "train"]
  return b"".join(pathlib.Path(root, p).read_bytes() for p in paths[:limit])


def compressor_bits(data: bytes) -> dict[str, float]:
  """Unigram entropy of the bytes and gzip -9's size, both in bits per byte."""
  counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
  probs = counts[counts > 0] / counts.sum()
  return {"unigram_bits": float(-(probs * np.log2(probs)).sum()),
          "gzip_bits": 8.0 * len(gzip.compress(data, 9)) / len(data)}


def run(seeds: Sequence[int], fast: bool) -> dict:
  rows = lm_runs.train_arms([("lm_dense", lm_dense.get_config)], seeds, fast)
  for row in rows:
    row["steps_per_s"] = round(row["steps"] / row["wall_s"], 2)
  return {"runs": rows, "corpus": compressor_bits(train_split_bytes(20 if fast else None))}


def table(payload: dict) -> str:
  runs = payload["runs"]
  return claims.markdown_table(
      ["", "steps", "eval bits/byte", "seeds"],
      [["`lm_dense.py`", runs[0]["steps"], claims.fmt([r["eval_bpb"] for r in runs]), len(runs)],
       ["unigram entropy of the train split", "-", f"{payload['corpus']['unigram_bits']:.2f}", "-"],
       ["`gzip -9` of the train split", "-", f"{payload['corpus']['gzip_bits']:.2f}", "-"]])


def judge(payload: dict) -> tuple[str, str]:
  """Yes when the mean eval bpb is under the unigram entropy and the range over two or more
  seeds is under SPREAD, partly when only the first holds, no otherwise."""
  bpb = [r["eval_bpb"] for r in payload["runs"]]
  mean, std = claims.mean_std(bpb)
  spread = max(bpb) - min(bpb)
  unigram = payload["corpus"]["unigram_bits"]
  verdict = (f"eval bpb {mean:.3f} ± {std:.3f} over {len(bpb)} seeds (range {spread:.3f}), "
             f"{abs(unigram - mean):.2f} bits/byte {'under' if mean < unigram else 'above'} the "
             f"unigram entropy; LM differences smaller than about {max(2 * std, spread):.3f} "
             f"bits/byte are ties.")
  small_spread = len(bpb) > 1 and spread < SPREAD
  reproduced = "yes" if mean < unigram and small_spread else "partly" if mean < unigram else "no"
  return reproduced, verdict


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, {"lm_dense": [r["eval_bpb"] for r in payload["runs"]]}, "eval bits/byte",
                  "default LM, eval bpb per seed")


CLAIM = claims.Claim(
    name="default_lm",
    title="The default job",
    source="this repository's quickstart (a baseline, not a paper's claim)",
    statement="The default byte LM learns well beyond byte frequencies in 400 steps, and its seed "
              "spread is small enough to rank the LM variants below.",
    setup="`lm_dense.py`: 3 pre-LN blocks of width 128 (4 heads, GELU FFN of 512, RoPE), 400 "
          "AdamW steps of 32 windows of 128 bytes of the embedded Python-stdlib corpus; eval on "
          "the validation files.",
    expected="eval bpb far below the unigram entropy, with a seed spread of a few thousandths",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=10)
