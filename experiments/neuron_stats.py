"""Neuron statistics of a trained LM: firing rates, dead / always-on / near-zero (lazy) neurons,
n-gram and positional neurons, top-activating contexts, per site.

  python -m experiments.neuron_stats --lm_workdir=/tmp/sparsejax_lm --workdir=/tmp/neuron_stats \
      [--sites=layer_*/ffn/hidden] [--windows=256]

Loads the LM run in --lm_workdir (training it there first when it holds none, with
--lm_config, default the default job experiments/configs/lm_dense.py), runs it over --windows
evenly spaced windows of its eval split, accumulates `sparsejax.activations.stats` batch by batch
and writes --workdir/neuron_stats.npz (every statistic) and neuron_stats.json (per site: firing
fraction, near-zero fraction, dead, always-on, the top positional / token / bigram neurons and
their top contexts as text snippets). A neuron fires on a token when its value > --eps.
"""
import argparse
import os
import sys

import jax
import numpy as np

from experiments import data as data_lib
from experiments.tasks import sae as sae_task
from sparsejax import models
from sparsejax.activations import stats as stats_lib

DEFAULT_LM_CONFIG = "experiments/configs/lm_dense.py"
SNIPPET_BYTES = 24  # bytes of context before the activating token


def neuron_stats(lm_workdir: str, workdir: str, *, lm_config: str = DEFAULT_LM_CONFIG,
                 sites: str = "layer_*/ffn/hidden", windows: int = 256, batch_size: int = 32,
                 eps: float = stats_lib.EPS, position_buckets: int = 16,
                 bigram_buckets: int = 4096, top_k: int = 8, top_neurons: int = 8) -> dict:
  """Computes and writes the statistics (see the module docstring); returns the JSON summary."""
  config, variables = sae_task.load_lm(lm_workdir, lm_config)
  lm = models.build_lm(config.model, vocab_size=data_lib.VOCAB_SIZE)
  data = config.data
  split = data_lib.load_windows(data.name, data.eval_split, config.train.seq_len,
                                data_dir=data.data_dir, text_key=data.text_key)
  count = min(windows, len(split))
  indices = np.arange(count, dtype=np.int64) * len(split) // count
  inputs_NT = np.stack([split[int(i)]["inputs"] for i in indices])
  stats = stats_lib.collect_neuron_stats(
      lm, variables, _batches(inputs_NT, indices, min(batch_size, count)), sites, eps=eps,
      num_position_buckets=min(position_buckets, config.train.seq_len),
      vocab_size=data_lib.VOCAB_SIZE, bigram_buckets=bigram_buckets, top_k=top_k,
      deterministic=True)
  rows = dict(zip(indices.tolist(), range(count)))
  extra = {}
  for site, state in stats.items():
    summary = stats_lib.json_summary(state, top=top_neurons)  # which neurons get contexts
    listed = sorted({f for key in ("top_positional", "top_token", "top_bigram")
                     for f, _ in summary.get(key, [])})
    acts_FK, contexts_FK2 = jax.device_get((state.top_acts_FK, state.top_contexts_FK2))
    extra[site] = {"eps": eps, "windows": count, "split": data.eval_split, "contexts": {
        str(f): [{"act": float(a), "window": int(w), "position": int(t),
                  "text": _snippet(inputs_NT[rows[int(w)]], int(t))}
                 for a, (w, t) in zip(acts_FK[f], contexts_FK2[f]) if w >= 0]
        for f in listed}}
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "neuron_stats")
  return stats_lib.save_stats(path, stats, extra=extra, top=top_neurons)


def _batches(inputs_NT: np.ndarray, indices: np.ndarray, batch_size: int):
  """{"inputs", "weights" (0 at PAD inputs), "window_ids"} batches of `batch_size` windows, the
  last filled up with PAD windows of weight 0 so every batch has one shape."""
  for start in range(0, len(inputs_NT), batch_size):
    tokens_BT, ids_B = inputs_NT[start:start + batch_size], indices[start:start + batch_size]
    filler = batch_size - len(tokens_BT)
    tokens_BT = np.concatenate([tokens_BT, np.full((filler, tokens_BT.shape[1]),
                                                   data_lib.PAD_ID, tokens_BT.dtype)])
    yield {"inputs": tokens_BT, "weights": (tokens_BT != data_lib.PAD_ID).astype(np.float32),
           "window_ids": np.concatenate([ids_B, np.full(filler, -1)])}


def _snippet(tokens_T: np.ndarray, position: int) -> str:
  """The bytes before `position` and, in [[ ]], the byte at it, as UTF-8 (EOS shown as <eos>)."""
  return (_decode(tokens_T[max(0, position - SNIPPET_BYTES):position])
          + f"[[{_decode(tokens_T[position:position + 1])}]]")


def _decode(ids_T: np.ndarray) -> str:
  """Byte tokens as UTF-8 text (invalid bytes replaced), EOS as "<eos>", PAD left out."""
  pieces, run = [], bytearray()
  for i in ids_T.tolist():
    if i < 256:
      run.append(i)
      continue
    pieces.append(run.decode("utf-8", errors="replace"))
    run = bytearray()
    if i == data_lib.EOS_ID:
      pieces.append("<eos>")
  return "".join(pieces) + run.decode("utf-8", errors="replace")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.neuron_stats",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--lm_workdir", required=True, help="a finished LM run (trained if absent)")
  parser.add_argument("--workdir", required=True, help="where to write neuron_stats.{npz,json}")
  parser.add_argument("--lm_config", default=DEFAULT_LM_CONFIG,
                      help="config to train the LM with when --lm_workdir holds none")
  parser.add_argument("--sites", default="layer_*/ffn/hidden",
                      help="site patterns, comma-separated")
  parser.add_argument("--windows", type=int, default=256, help="eval windows to read")
  parser.add_argument("--batch_size", type=int, default=32, help="windows per forward pass")
  parser.add_argument("--eps", type=float, default=stats_lib.EPS, help="firing threshold on |a|")
  parser.add_argument("--position_buckets", type=int, default=16)
  parser.add_argument("--bigram_buckets", type=int, default=4096)
  parser.add_argument("--top_k", type=int, default=8, help="top contexts kept per neuron")
  parser.add_argument("--top_neurons", type=int, default=8, help="neurons listed per score")
  args = parser.parse_args(argv)
  if args.windows < 1 or args.batch_size < 1:
    print(f"error: --windows={args.windows} and --batch_size={args.batch_size} must be >= 1",
          file=sys.stderr)
    return 1
  try:
    summary = neuron_stats(
        args.lm_workdir, args.workdir, lm_config=args.lm_config, sites=args.sites.split(","),
        windows=args.windows, batch_size=args.batch_size, eps=args.eps,
        position_buckets=args.position_buckets, bigram_buckets=args.bigram_buckets,
        top_k=args.top_k, top_neurons=args.top_neurons)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{'site':24} {'firing':>8} {'near-zero':>10} {'dead':>6} {'always-on':>10}")
  for site, s in summary.items():
    print(f"{site:24} {s['firing_fraction']:8.4f} {s['near_zero_fraction']:10.4f} "
          f"{s['dead']:6d} {s['always_on']:10d}")
  print(f"wrote {os.path.join(args.workdir, 'neuron_stats')}.npz and .json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
