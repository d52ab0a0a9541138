"""Fit the sparse scaling law to a sweep of "lm" runs and print the optimal sparsity per budget.

  python -m experiments.scaling --runs DIR1 DIR2 ... [--budget N:C ...] [--json FILE]

Each DIR is a finished `experiments.train` workdir (config.json + metrics.jsonl). Per run: N = its
non-zero params (the model rebuilt from config.json as shapes only, each leaf's size times its
last logged `density/<path>`, dense leaves in full, embeddings included), S = 1 - N / total
params, D = step x batch x seq_len at the last eval, loss = that eval's
`eval/loss` (nats per byte), FLOPs = 6 x total params x D (the trainer runs masked weights as
dense matmuls; attention's own FLOPs are left out).

Prints the runs, the fit of L(S, N, D) = (a_S (1 - S)^b_S + c_S) (1/N)^b_N + (a_D / D)^b_D + c
(`sparsejax.masks.scaling`, Frantar et al. 2023) with its RMS log residual (needs >= 7 runs),
the optimal sparsity at each budget (N non-zero params, C training FLOPs; default: each
run's own (N, C)), and each sparse run against the dense runs at equal non-zero params and
tokens, and at equal training FLOPs (the dense loss interpolated log-log between the bracketing
dense runs, "-" outside their range; no extrapolation). Runs in seconds on a CPU (shape-only model builds, a small least-squares fit).
"""
import argparse
import json
import os
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import run_config
from sparsejax import masks
from sparsejax import models
from sparsejax.masks import scaling

FLOPS_PER_PARAM_TOKEN = 6.0


def param_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{param path: size} of the "lm" run's model, built as shapes only (no data is read)."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if model_config.ffn.get("token_frequencies") == "train":  # data statistics: shape-neutral
    model_config.ffn.token_frequencies = (1.0 / data_lib.VOCAB_SIZE,) * data_lib.VOCAB_SIZE
  model = models.build_lm(model_config, vocab_size=data_lib.VOCAB_SIZE)
  inputs = jnp.zeros((1, config.train.seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, inputs)
  params = nn.meta.unbox(variables["params"])
  return {path: leaf.size for path, leaf in masks.leaves_by_path(params).items()}


def read_run(workdir: str) -> dict:
  """One row: name, method, density, sparsity, total_params, nonzero_params, tokens, flops, loss."""
  with open(os.path.join(workdir, run_config.CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.task != "lm":
    raise ValueError(f"{workdir} holds a {config.task!r} run; only 'lm' runs have tokens")
  records = metrics_lib.read_metrics(workdir)
  evals = [r for r in records if "eval/loss" in r]
  if not evals:
    raise ValueError(f"{workdir}/metrics.jsonl holds no eval/loss record")
  last = evals[-1]
  logged = [r for r in records if "density/global" in r and r["step"] <= last["step"]]
  densities = {k[len("density/"):]: v for k, v in (logged[-1] if logged else {}).items()
               if k.startswith("density/") and k != "density/global"}
  sizes = param_sizes(config)
  unknown = sorted(set(densities) - set(sizes))
  if unknown:
    raise ValueError(f"{workdir} logs densities of {unknown}, which its config's model lacks")
  total = sum(sizes.values())
  nonzero = sum(size * densities.get(path, 1.0) for path, size in sizes.items())
  tokens = last["step"] * config.train.batch_size * config.train.seq_len
  sparse = config.sparsity.enabled
  return {"name": os.path.basename(os.path.normpath(workdir)),
          "method": config.sparsity.updater.name if sparse else "dense",
          "density": nonzero / total, "sparsity": 1.0 - nonzero / total,
          "total_params": total, "nonzero_params": nonzero, "tokens": tokens,
          "flops": FLOPS_PER_PARAM_TOKEN * total * tokens, "loss": float(last["eval/loss"])}


def parse_budget(text: str) -> tuple[float, float]:
  """"N:C" -> (non-zero params, training FLOPs), e.g. "1e6:1e15"."""
  try:
    n, c = (float(v) for v in text.split(":"))
  except ValueError:
    raise ValueError(f"--budget={text!r} must be N:C, e.g. 1e6:1e15") from None
  if n <= 0 or c <= 0:
    raise ValueError(f"--budget={text!r}: N and C must be positive")
  return n, c


def _num(value) -> str:
  return "-" if value is None else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(v if isinstance(v, str) else _num(v) for v in r) + " |"
            for r in rows]
  return "\n".join(lines)


def report(rows: list[dict], budgets: Sequence[tuple[float, float]]) -> tuple[str, dict]:
  """(markdown report, JSON-able results) of the runs: table, fit, optimal sparsity, comparisons."""
  parts = ["## runs", _table(
      ["run", "method", "sparsity", "total params", "non-zero params", "tokens", "FLOPs", "loss"],
      [[r["name"], r["method"], r["sparsity"], r["total_params"], r["nonzero_params"],
        r["tokens"], r["flops"], r["loss"]] for r in rows])]
  results = {"runs": rows}
  if len(rows) >= len(scaling.PARAM_NAMES):
    fit = scaling.fit_sparse_scaling_law(*([r[k] for r in rows] for k in (
        "sparsity", "nonzero_params", "tokens", "loss")))
    constant = [k for k in ("sparsity", "nonzero_params", "tokens")
               if len({round(r[k], 9) for r in rows}) < 2]
    parts += ["## fit", _table(list(scaling.PARAM_NAMES) + ["RMS log residual"],
                               [list(fit.params.values()) + [fit.rms_log_residual]])]
    if constant:
      parts.append(f"warning: {', '.join(constant)} take one value; the fit is not identifiable")
    optima = [{"nonzero_params": n, "flops": c, **scaling.optimal_sparsity(
        fit.params, n, c, FLOPS_PER_PARAM_TOKEN)} for n, c in budgets]
    parts += ["## optimal sparsity per budget (sparse training costs dense FLOPs)", _table(
        ["non-zero params", "FLOPs", "optimal sparsity", "tokens", "predicted loss",
         "dense loss"], [[o["nonzero_params"], o["flops"], o["sparsity"], o["tokens"], o["loss"],
                          o["dense_loss"]] for o in optima])]
    results.update(fit={"params": fit.params, "rms_log_residual": fit.rms_log_residual},
                   optimal_sparsity=optima)
  else:
    parts.append(f"(no fit: {len(rows)} runs, the law needs >= {len(scaling.PARAM_NAMES)})")
  if any(r["density"] >= 1.0 for r in rows) and any(r["density"] < 1.0 for r in rows):
    for key, same, title in (("nonzero_params", ("tokens",), "equal non-zero params and tokens"),
                             ("flops", (), "equal training FLOPs")):
      compared = scaling.compare_to_dense(rows, key, same)
      parts += [f"## sparse vs dense at {title}", _table(
          ["run", "method", "sparsity", key, "loss", "dense loss", "delta"],
          [[r["name"], r["method"], r["sparsity"], r[key], r["loss"], r["dense_loss"],
            r["delta"]] for r in compared])]
      results[f"vs_dense_at_{key}"] = compared
  return "\n\n".join(parts), results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.scaling",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--runs", nargs="+", required=True, help="lm run workdirs")
  parser.add_argument("--budget", nargs="*", default=None,
                      help="N:C budgets (non-zero params : training FLOPs); default: the runs'")
  parser.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = parser.parse_args(argv)
  try:
    rows = [read_run(d) for d in args.runs]
    budgets = ([parse_budget(b) for b in args.budget] if args.budget else
               sorted({(r["nonzero_params"], r["flops"]) for r in rows}))
    text, results = report(rows, budgets)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
