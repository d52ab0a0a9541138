"""Claims from the literature, each reproduced by one module and run by one command.

  python -m experiments.claims NAME [--seeds N] [--fast] [--out DIR]
  python -m experiments.claims --all --fast
  python -m experiments.claims --list

A claim module `experiments/claims/NAME.py` defines `CLAIM = Claim(...)`: what the paper says,
the setup, the expected ordering, and four functions: `run(seeds, fast) -> payload` (any JSON
value: the runs' rows), `table(payload) -> markdown`, `judge(payload) -> (reproduced, verdict)`
with reproduced one of "yes" / "partly" / "no" and verdict a sentence quoting the numbers that
decide it, and `plot(payload, path)` writing a PNG. The runner writes `DIR/NAME.json` (the claim's
text, the command, seeds, wall time, verdict and payload), `DIR/NAME.md` (the table) and
`DIR/NAME.png`; DIR is `experiments/claims/results/` (committed; the README's results section is
generated from it by `python -m experiments.claims.readme`) or, with `--fast`, the uncommitted
`experiments/claims/results/fast/`, whose numbers are smoke-test numbers and mean nothing.
"""
import contextlib
import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
FAST_RESULTS_DIR = os.path.join(RESULTS_DIR, "fast")
VERDICTS = ("yes", "partly", "no")

# Every claim, in the order the README lists them.
NAMES = (
    "default_lm",
    "moe_lm_flops",
    "hash_vs_switch",
    "avg_k",
    "aux_free_balance",
    "upcycling",
    "soft_moe_cnn",
    "sparse_mlp",
    "erk_vs_uniform",
    "pkm_vs_dense",
    "memory_finetune",
    "sae_synthetic",
    "sae_lm",
    "sparse_attention",
    "decode_budget",
    "activation_ffn",
    "lm_neurons",
    "lista",
    "cospadi",
    "acdc_mlp",
    "sam_on_norm",
    "layer_lottery",
    "scaling_law",
    "hecate",
)


@dataclasses.dataclass(frozen=True)
class Claim:
  """One reproduced claim: its text and the functions that run, tabulate, judge and plot it.

  Attributes:
    name: the module name, also the results' file stem.
    title: a few words for the README heading.
    source: the paper(s) the claim comes from, with year.
    statement: what the paper claims, in one or two sentences.
    setup: what we run (model, data, steps, arms), without numbers measured here.
    expected: the ordering that would reproduce the claim.
    run: (seeds, fast) -> payload, a JSON value holding every run's numbers.
    table: payload -> markdown table (means ± sample std over seeds where there are several).
    judge: payload -> (reproduced in VERDICTS, one sentence quoting the deciding numbers).
    plot: (payload, png_path) -> None.
    default_seeds: how many seeds a full run uses (0, 1, ... N-1).
    minutes: a full run's wall time on an idle 2-core CPU, roughly.
  """
  name: str
  title: str
  source: str
  statement: str
  setup: str
  expected: str
  run: Callable[[Sequence[int], bool], Any]
  table: Callable[[Any], str]
  judge: Callable[[Any], tuple[str, str]]
  plot: Callable[[Any, str], None]
  default_seeds: int = 3
  minutes: float = 5.0


def load(name: str) -> Claim:
  """The `CLAIM` of `experiments.claims.NAME`; a ValueError names the known claims."""
  if name not in NAMES:
    raise ValueError(f"unknown claim {name!r}; known: {', '.join(NAMES)}")
  return importlib.import_module(f"experiments.claims.{name}").CLAIM


def command(name: str, num_seeds: int) -> str:
  return f"python -m experiments.claims {name} --seeds {num_seeds}"


def envelope(claim: Claim, payload: Any, seeds: Sequence[int], fast: bool,
             wall_s: float | None, date: str) -> dict:
  """The JSON record of one run of `claim`: its text, command, seeds, verdict and payload."""
  reproduced, verdict = claim.judge(payload)
  if reproduced not in VERDICTS:
    raise ValueError(f"{claim.name}: judge returned {reproduced!r}; allowed: {VERDICTS}")
  return {"name": claim.name, "title": claim.title, "source": claim.source,
          "statement": claim.statement, "setup": claim.setup, "expected": claim.expected,
          "command": command(claim.name, len(seeds)) + (" --fast" if fast else ""),
          "seeds": list(seeds), "fast": fast, "wall_s": wall_s, "date": date,
          "reproduced": reproduced, "verdict": verdict, "payload": payload}


def write(out_dir: str, claim: Claim, record: dict) -> list[str]:
  """Writes OUT_DIR/NAME.{json,md,png} for `record` (from `envelope`); returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, claim.name)
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  with open(stem + ".md", "w") as f:
    f.write(claim.table(record["payload"]) + "\n")
  claim.plot(record["payload"], stem + ".png")
  return [stem + ".json", stem + ".md", stem + ".png"]


def load_result(name: str, results_dir: str = RESULTS_DIR) -> dict:
  """The stored JSON record of claim NAME (its "payload" holds the runs)."""
  with open(os.path.join(results_dir, f"{name}.json")) as f:
    return json.load(f)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std with ddof=1; 0.0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3) -> str:
  """'m ± s' over seeds, or just 'm' for one value."""
  mean, std = mean_std(values)
  return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def group(rows: Sequence[dict], key: str, metric: str) -> dict[Any, list[float]]:
  """{row[key]: [row[metric], ...]} in first-seen order of the keys."""
  out: dict[Any, list[float]] = {}
  for row in rows:
    out.setdefault(row[key], []).append(row[metric])
  return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


@contextlib.contextmanager
def figure(path: str, figsize: tuple[float, float], title: str):
  """Yields the axes of a one-panel matplotlib figure (Agg backend), then titles it and writes it
  to `path` as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=figsize)
  try:
    yield ax
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
  finally:
    plt.close(fig)


def bar_plot(path: str, groups: dict[str, Sequence[float]], ylabel: str, title: str) -> None:
  """Bars of each group's mean with its seeds' min-max as error bars and the seeds as dots."""
  names = list(groups)
  with figure(path, (max(4.0, 0.9 * len(names) + 1.5), 3.2), title) as ax:
    for i, name in enumerate(names):
      values = np.asarray(groups[name], np.float64)
      ax.bar(i, values.mean(), color="tab:blue", alpha=0.6)
      ax.vlines(i, values.min(), values.max(), color="k")
      ax.plot(np.full(values.shape, i), values, "k.", markersize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    low = min(min(v) for v in groups.values())
    high = max(max(v) for v in groups.values())
    pad = 0.1 * (high - low) or 0.05 * abs(high) or 0.1
    ax.set_ylim(low - 3 * pad, high + pad)
    ax.set_ylabel(ylabel)
