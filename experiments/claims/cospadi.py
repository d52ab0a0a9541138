"""CoSpaDi vs SparseGPT (and Wanda): layer output error at an equal count of stored values.

  python -m experiments.claims.cospadi [--fast] [--lm_workdir DIR] [--out DIR]

On the default LM (`--lm_workdir`, default /tmp/sparsejax_lm, used when it holds a finished
dense run; else a random rank-32 + noise 256 x 256 matrix with correlated Gaussian inputs) this
takes layer 1's FFN kernels, W_in [128, 512] with the inputs of `layer_1/ffn/in` and W_out
[512, 128] with those of `layer_1/ffn/hidden`, over the tokens of 32 eval windows: the even
windows calibrate, the odd ones evaluate. For each density d, SparseGPT and Wanda keep
round(d I O) weights; CoSpaDi (`sparsejax.masks.cospadi`, 20 MOD iterations) gets the same
number of stored values, I M + O s, for each code sparsity s with M >= s atoms. Reported:
held-out relative output error ||x (w - w_hat)||_F / ||x w||_F. Indices are not counted (a
mask or d I O indices for SparseGPT, O s atom ids of log2 M bits for CoSpaDi).
`--fast`: W_out only, d = 0.25, s = 16, 5 iterations, 8 windows. Writes DIR/cospadi.{json,md}.
Wall time on a 2-core CPU under load: 4 min; `--fast` 25 s.

Shopkhoev et al. 2025 (CoSpaDi) report lower error than pruning / low-rank baselines at equal
compression. Measured (default LM, best s): on W_in (I = 128 < O = 512) CoSpaDi beats SparseGPT,
0.125 vs 0.149 at d = 0.5 and 0.244 vs 0.357 at d = 0.25; on W_out (I = 512, each atom costs
512 values) it loses, 0.232 vs 0.114 and 0.402 vs 0.268 (Wanda: 0.175, 0.380).
"""
import argparse
import os

import jax
import numpy as np

from experiments import claims
from sparsejax.masks import cospadi, oneshot

DENSITIES = (0.5, 0.25)
SPARSITIES = (8, 16, 32)
WINDOWS = 32
SITES = {"W_in": ("ffn/wi", "layer_1/ffn/in"), "W_out": ("ffn/wo", "layer_1/ffn/hidden")}


def lm_layers(lm_workdir: str, windows: int, names: tuple[str, ...]) -> dict[str, tuple]:
  """{name: (w_IO, x_calib_NI, x_eval_NI)} for layer 1's FFN kernels of the LM in lm_workdir."""
  # Imported here: the random fallback needs neither the data pipeline nor the model zoo.
  from experiments import data as data_lib  # pylint: disable=import-outside-toplevel
  from experiments.tasks import sae as sae_task  # pylint: disable=import-outside-toplevel
  from sparsejax import models, sites  # pylint: disable=import-outside-toplevel
  config, variables = sae_task.load_lm(lm_workdir, None)
  lm = models.build_lm(config.model, vocab_size=data_lib.VOCAB_SIZE)
  split = data_lib.load_windows(config.data.name, config.data.eval_split, config.train.seq_len,
                                data_dir=config.data.data_dir, text_key=config.data.text_key)
  indices = np.arange(windows) * len(split) // windows
  tokens_NT = np.stack([split[int(i)]["inputs"] for i in indices])
  site_names = [SITES[name][1] for name in names]
  _, captured = jax.jit(lambda v, t: sites.collect(lm, v, t, sites=site_names,
                                                   deterministic=True))(variables, tokens_NT)
  layer_params = variables["params"]["layer_1"]
  layers = {}
  for name in names:
    param_path, site = SITES[name]
    module, leaf = param_path.split("/")
    x_NTI = np.asarray(captured[site], np.float32)
    layers[name] = (np.asarray(layer_params[module][leaf], np.float32),
                    x_NTI[0::2].reshape(-1, x_NTI.shape[-1]),
                    x_NTI[1::2].reshape(-1, x_NTI.shape[-1]))
  return layers


def random_layer(seed: int = 0, size: int = 256, rank: int = 32, tokens: int = 2048) -> tuple:
  """(w_IO, x_calib, x_eval): rank-32 + 0.1 noise weights, inputs with a decaying spectrum."""
  rng = np.random.default_rng(seed)
  w_IO = rng.normal(size=(size, rank)) @ rng.normal(size=(rank, size)) / np.sqrt(rank)
  w_IO += 0.1 * rng.normal(size=(size, size))
  mix_II = rng.normal(size=(size, size)) * np.linspace(1.0, 0.05, size)[None, :]
  x_NI = rng.normal(size=(tokens, size)) @ mix_II.T
  return (w_IO.astype(np.float32), x_NI[0::2].astype(np.float32),
          x_NI[1::2].astype(np.float32))


def relative_error(w_IO: np.ndarray, w_hat_IO: np.ndarray, x_NI: np.ndarray) -> float:
  return float(np.linalg.norm(x_NI @ (w_IO - w_hat_IO)) / np.linalg.norm(x_NI @ w_IO))


def layer_rows(name: str, w_IO, x_calib, x_eval, densities, sparsities, iters) -> list[dict]:
  """One row per (density, method[, sparsity]) for one layer."""
  inputs, outputs = w_IO.shape
  rows = []
  for density in densities:
    budget = int(round(density * inputs * outputs))
    base = {"layer": name, "shape": [inputs, outputs], "density": density, "params": budget}
    for method, prune in (("sparsegpt", oneshot.sparsegpt_prune), ("wanda", oneshot.wanda_prune)):
      w_hat, _ = prune(w_IO, x_calib, density)
      rows.append({**base, "method": method,
                   "error": relative_error(w_IO, np.asarray(w_hat), x_eval)})
    for sparsity in sparsities:
      atoms = (budget - outputs * sparsity) // inputs
      if atoms < sparsity:
        continue
      d_IM, s_MO = cospadi.cospadi_compress(w_IO, x_calib, atoms, sparsity, iters)
      w_hat = np.asarray(d_IM) @ np.asarray(s_MO)
      rows.append({**base, "method": f"cospadi s={sparsity} M={atoms}",
                   "params": cospadi.cospadi_param_count(inputs, outputs, atoms, sparsity),
                   "error": relative_error(w_IO, w_hat, x_eval)})
      print(f"{name} d={density} {rows[-1]['method']}: {rows[-1]['error']:.4f}", flush=True)
  return rows


def table(rows: list[dict], source: str) -> str:
  lines = [f"Source: {source}. Held-out relative output error ||x (w - w_hat)|| / ||x w||.", "",
           "| layer [I, O] | density | method | stored values | error |",
           "|---|---:|---|---:|---:|"]
  lines += [f"| {r['layer']} {r['shape']} | {r['density']} | {r['method']} | {r['params']} | "
            f"{r['error']:.4f} |" for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims.cospadi",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--lm_workdir", default="/tmp/sparsejax_lm")
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  parser.add_argument("--fast", action="store_true", help="one layer, one density, 5 iterations")
  args = parser.parse_args(argv)
  densities, sparsities, iters = ((0.25,), (16,), 5) if args.fast else (DENSITIES, SPARSITIES, 20)
  names = ("W_out",) if args.fast else tuple(SITES)
  if os.path.exists(os.path.join(args.lm_workdir, "config.json")):
    source = f"default LM in {os.path.abspath(args.lm_workdir)}, layer 1 FFN"
    layers = lm_layers(args.lm_workdir, 8 if args.fast else WINDOWS, names)
  else:
    source = "random rank-32 + noise 256 x 256 matrix"
    layers = {"random": random_layer()}
  rows = [row for name, (w, xc, xe) in layers.items()
          for row in layer_rows(name, w, xc, xe, densities, sparsities, iters)]
  text = table(rows, source)
  claims.write_results(args.out, "cospadi", {"source": source, "iters": iters, "rows": rows},
                       text)
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
