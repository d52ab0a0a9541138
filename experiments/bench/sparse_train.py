"""One LM train step on CPU, fp32: dense FFN kernels vs block-sparse (BSR) FFN kernels.

`python -m experiments.bench sparse_train [--json FILE] [--repeats N] [--quick]`

Each case is one jitted train step (forward, backward, clipped AdamW update) of a 2-layer
byte-level `TransformerLM` with d_model = 1024, 8 heads, FFN hidden 4096, seq 256, batch 8
(`--quick`: 1 layer, d_model 32, 2 heads, hidden 64, seq 8, batch 2, 16x16 blocks):

* `dense_step` (the baseline): dense FFN kernels ("dense" FFN), plain AdamW.
* `block_sparse_step`: the "block_sparse" FFN (`sparsejax.masks.bsr`) keeping 10 % of the
  128x128 blocks of every FFN kernel, run through `kernels.block_sparse` in forward and
  backward, under `bsr.block_wrap` (RigL, its schedule between update steps: no dense-gradient
  probe, no swap; an update step adds one dense x^T dy per kernel).
* `block_sparse_step_d50`: the same at 50 % block density.

The cases are timed interleaved (`timing.interleaved_cases`: a warm-up round, then `--repeats`
rounds of every case in turn); each row has median_s / min_s / max_s, `time_vs_dense` (its
median over dense_step's) and the target. Targets: block_sparse_step <= 0.6x dense_step,
block_sparse_step_d50 <= 1.0x.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments.bench import timing
from sparsejax import models
from sparsejax.masks import bsr
from sparsejax.masks.schedules import Cosine

DESCRIPTION = ("fp32 LM train step on CPU (2 layers, d=1024, FFN 4096, seq 256, batch 8): dense "
               "FFN vs block-sparse FFN (128x128 blocks, 10 % / 50 %)")
BASELINE = "dense_step"
# Columns of the README table (experiments/claims/readme.py): {row key: header}.
README_COLUMNS = {"density": "block density", "time_vs_dense": "time vs `dense_step`",
                  "target": "target: time at most", "met": "met"}
# Maximum time of a case relative to dense_step.
TARGETS = {"block_sparse_step": 0.6, "block_sparse_step_d50": 1.0}
VOCAB = 256

_FULL = {"layers": 2, "d": 1024, "heads": 8, "ff": 4096, "seq": 256, "batch": 8, "block": 128}
_QUICK = {"layers": 1, "d": 32, "heads": 2, "ff": 64, "seq": 8, "batch": 2, "block": 16}


def lm_config(shape: dict[str, int], ffn: dict[str, Any]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "d_model": shape["d"], "num_layers": shape["layers"], "num_heads": shape["heads"], "d_ff": shape["ff"],
      "max_len": shape["seq"], "ffn": ffn})


def make_step(model, tx: optax.GradientTransformation):
  """(params, opt_state, tokens) -> (params, opt_state, loss): next-byte cross-entropy."""

  def loss_fn(params, tokens_BT):
    logits_BTV, _ = model.apply({"params": params}, tokens_BT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()

  def step(params, opt_state, tokens_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def adamw() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))


def _case(shape: dict[str, int], ffn: dict[str, Any], tokens_BT: jax.Array):
  """(step, (params, opt_state, tokens)) at a non-update step of the block updater."""
  model = models.build_lm(lm_config(shape, ffn), vocab_size=VOCAB)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens_BT[:, :-1])["params"]
  params = nn.meta.unbox(params)
  tx = adamw()
  if ffn["name"] == "block_sparse":
    tx = bsr.block_wrap(tx, "rigl", Cosine(drop_fraction=0.3, end=1000, update_every=100))
    params = _without_probe(params)
  opt_state = tx.init(params)
  if ffn["name"] == "block_sparse":
    opt_state = opt_state._replace(step=jnp.ones((), jnp.int32))  # step 1: no update
  return make_step(model, tx), (params, opt_state, tokens_BT)


def _without_probe(params):
  """params with every block-sparse kernel's probe at 0 (a step whose gradient no update reads)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if getattr(path[-1], "key", None) == bsr.PROBE else p,
      params)


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The three rows (see the module docstring), timed interleaved."""
  shape = _QUICK if quick else _FULL
  tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (shape["batch"], shape["seq"] + 1), 0,
                                 VOCAB)
  block = (shape["block"], shape["block"])
  ffns = {BASELINE: {"name": "dense"},
          "block_sparse_step": {"name": "block_sparse", "block": block, "density": 0.1},
          "block_sparse_step_d50": {"name": "block_sparse", "block": block, "density": 0.5}}
  cases = {name: _case(shape, ffn, tokens_BT) for name, ffn in ffns.items()}
  rows = timing.interleaved_cases(cases, repeats=repeats)
  base = next(r["median_s"] for r in rows if r["case"] == BASELINE)
  for row in rows:
    row["density"] = ffns[row["case"]].get("density", 1.0)
    if row["case"] in TARGETS:
      row["time_vs_dense"] = row["median_s"] / base
      row["target"] = TARGETS[row["case"]]
      row["met"] = bool(row["time_vs_dense"] <= row["target"])
  return rows
