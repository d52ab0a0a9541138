"""How sparse the default LM's own FFN activations are, and how few neurons a probe needs.

  python -m experiments.claims lm_neurons [--fast]

On the default LM (the quickstart's /tmp/sparsejax_lm; trained there with
experiments/configs/lm_dense.py first when it holds no finished run, ~5 min on an idle 2-core
CPU) this runs `python -m experiments.neuron_stats` over 256 eval windows and reports per layer
the fraction of FFN hidden units that fire (> 0.01) per token, the near-zero fraction
(|a| <= 0.01: Li et al. 2023, "The Lazy Neuron Phenomenon"), dead and always-on neurons, and the
best token / bigram / positional neuron scores (Voita et al. 2023, "Neurons in Large Language
Models: Dead, N-gram, Positional"). It then fits k-sparse logistic probes (Gurnee et al. 2023,
"Finding Neurons in a Haystack") on layer 1's hidden units for three byte-level labels, on the
first half of 64 eval windows, and reports held-out accuracy on the second half for k = 1, 4, 16
against the majority-class baseline. About 1 minute once the LM exists. The LM is
deterministic, so there is one seed. `--fast`: a 2-step 3-block LM of width 32 and 32 windows.
"""
import tempfile
from typing import Sequence

import numpy as np

from experiments import claims
from experiments.claims import lm_runs
from experiments import data as data_lib
from experiments import neuron_stats as neuron_stats_lib
from experiments.tasks import sae as sae_task
from sparsejax import models
from sparsejax.activations import probes

PROBE_SITE = "layer_1/ffn/hidden"
PROBE_LABELS = ("in_word", "after_space", "digit")
PROBE_KS = (1, 4, 16)
PROBE_WINDOWS = 64


def layer_rows(summary: dict) -> list[dict]:
  """One row per site of the neuron-statistics summary."""
  return [{"site": site,
           "firing_fraction": s["firing_fraction"],
           "near_zero_fraction": s["near_zero_fraction"],
           "dead": s["dead"], "always_on": s["always_on"], "neurons": s["num_neurons"],
           "top_token_score": s["top_token"][0][1],
           "top_bigram_score": s["top_bigram"][0][1],
           "top_positional_bits": s["top_positional"][0][1]}
          for site, s in sorted(summary.items())]


def probe_rows(lm_workdir: str) -> list[dict]:
  """Held-out accuracy of k-sparse probes on `PROBE_SITE` for each label and k."""
  config, variables = sae_task.load_lm(lm_workdir, None)
  lm = models.build_lm(config.model, vocab_size=data_lib.VOCAB_SIZE)
  split = data_lib.load_windows(config.data.name, config.data.eval_split, config.train.seq_len,
                                data_dir=config.data.data_dir, text_key=config.data.text_key)
  indices = np.arange(PROBE_WINDOWS) * len(split) // PROBE_WINDOWS
  tokens_NT = np.stack([split[int(i)]["inputs"] for i in indices])
  half = PROBE_WINDOWS // 2
  batches = [{"inputs": part, "weights": (part != data_lib.PAD_ID).astype(np.float32)}
             for part in (tokens_NT[:half], tokens_NT[half:])]
  rows = []
  for label in PROBE_LABELS:
    acts_NF, labels_N = probes.probe_dataset(lm, variables, batches, PROBE_SITE, label,
                                             deterministic=True)
    n = len(labels_N) // 2  # the first batch's tokens fit, the second's test
    held_out = labels_N[n:]
    row = {"label": label, "site": PROBE_SITE,
           "majority": float(max(held_out.mean(), 1 - held_out.mean()))}
    for k in PROBE_KS:
      probe = probes.fit_sparse_probe(acts_NF[:n], labels_N[:n], k, l2=1.0)
      row[f"k{k}"] = float(probes.probe_accuracy(probe, acts_NF[n:], held_out))
    rows.append(row)
  return rows


def run(seeds: Sequence[int], fast: bool) -> dict:
  """Neuron statistics per FFN layer and the probes; `seeds` is unused (the LM is fixed)."""
  with lm_runs.default_lm(fast) as lm_workdir, tempfile.TemporaryDirectory() as workdir:
    summary = neuron_stats_lib.neuron_stats(lm_workdir, workdir, windows=32 if fast else 256)
    return {"layers": layer_rows(summary), "probes": probe_rows(lm_workdir)}


def table(payload: dict) -> str:
  layers, probe_results = payload["layers"], payload["probes"]
  lines = ["| site | firing (> 0.01) | near-zero (abs <= 0.01) | dead | always-on | best token "
           "/ bigram score | best positional (bits) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  lines += [f"| `{r['site']}` | {r['firing_fraction']:.3f} | {r['near_zero_fraction']:.3f} | "
            f"{r['dead']} / {r['neurons']} | {r['always_on']} | {r['top_token_score']:.2f} / "
            f"{r['top_bigram_score']:.2f} | {r['top_positional_bits']:.3f} |" for r in layers]
  lines += ["", f"| probe label ({PROBE_SITE}) | majority | "
            + " | ".join(f"k={k}" for k in PROBE_KS) + " |",
            "|---|---:|" + "---:|" * len(PROBE_KS)]
  lines += [f"| {r['label']} | {r['majority']:.3f} | "
            + " | ".join(f"{r[f'k{k}']:.3f}" for k in PROBE_KS) + " |" for r in probe_results]
  return "\n".join(lines)


def judge(payload: dict) -> tuple[str, str]:
  """Yes when a minority of the hidden units fire per token in every layer (activation
  sparsity) and a 16-neuron probe beats the majority class on "in_word" by 10 points."""
  firing = [r["firing_fraction"] for r in payload["layers"]]
  in_word = next(r for r in payload["probes"] if r["label"] == "in_word")
  sparse, probe = max(firing) < 0.5, in_word["k16"] > in_word["majority"] + 0.1
  reproduced = "yes" if sparse and probe else "partly" if sparse or probe else "no"
  near_zero = [r["near_zero_fraction"] for r in payload["layers"]]
  return reproduced, (f"{min(firing):.1%}-{max(firing):.1%} of the FFN hidden units fire (> 0.01) "
                      f"on a given byte, but with GELU only {min(near_zero):.1%}-"
                      f"{max(near_zero):.1%} are near zero (|a| <= 0.01), so most of the rest are "
                      f"small negative values a skip would drop; one neuron tells \"inside a word\" apart "
                      f"{in_word['k1']:.1%} of the time and 16 do {in_word['k16']:.1%} "
                      f"(majority class {in_word['majority']:.1%}).")


def plot(payload: dict, path: str) -> None:
  with claims.figure(path, (5, 3.4), f"k-sparse probes on {PROBE_SITE}") as ax:
    for r in payload["probes"]:
      ax.plot(PROBE_KS, [r[f"k{k}"] for k in PROBE_KS], "o-", label=f"{r['label']} "
              f"(majority {r['majority']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("neurons in the probe (k)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7)


CLAIM = claims.Claim(
    name="lm_neurons",
    title="Neurons of the default LM",
    source="Li et al. 2023, The Lazy Neuron Phenomenon; Voita et al. 2023, Neurons in LLMs: "
           "Dead, N-gram, Positional; Gurnee et al. 2023, Finding Neurons in a Haystack",
    statement="Trained Transformers' FFN activations are sparse (few hidden units fire per "
              "token), some neurons respond to single tokens, and simple features are readable "
              "from a handful of neurons.",
    setup="The default LM's FFN hidden units (512 per layer) over 256 eval windows; k-sparse "
          "logistic probes on layer 1's hidden units, fit on 32 windows, scored on 32 others.",
    expected="well under half of the units firing per token; a 16-neuron probe far above the "
             "majority class",
    run=run, table=table, judge=judge, plot=plot, default_seeds=1, minutes=1)
