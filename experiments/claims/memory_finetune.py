"""Claim: sparse memory finetuning learns new facts with less forgetting than full or LoRA finetuning.

  python -m experiments.claims.memory_finetune [--pretrain_steps N] [--finetune_steps N] [--out DIR]

1. Pretrains a small byte-level LM with a product-key memory in its last block (2 blocks,
   d_model 64, memory N = 64^2 slots, 2 heads x top-8) on the train split of the embedded
   stdlib corpus (the "background").
2. Generates a deterministic set of made-up facts ("the zorvat of quelmin is dabrux.", seeded
   syllables, never in the corpus) as the "new data".
3. From the pretrained params, finetunes on the facts three ways, each with Adam (no decay,
   global-norm clip 1) for the same number of steps and the same batches, at each learning rate
   of `LEARNING_RATES`:
   * full: every parameter;
   * lora: rank-4 deltas W + A B on every attention projection and dense-FFN matrix (A random,
     B zero at the start), nothing else trained;
   * sparse_memory: only the value rows of the top-t memory slots by TF-IDF (reads on the facts
     vs how many of `BACKGROUND_DOCS` pretraining windows read each slot), via
     `sparsejax.memory.finetune.sparse_update`; every other param stays bit-identical.
4. Reports bits per byte on the facts (learning) and on the stdlib validation split
   (forgetting) before and after, to `DIR/memory_finetune.json` and `DIR/memory_finetune.md`.

Measured: 8.6 min wall on a busy shared 2-core CPU (3.3 min of it pretraining). At equal
learning (facts ~2.2 bpb) sparse memory finetuning forgot +0.39 validation bpb against LoRA's
+1.62; full finetuning forgot +4.5 bpb or more at every learning rate (table in the README).
Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"; Hu et al. 2021, "LoRA".
"""
import argparse
import math
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import claims
from experiments import data as data_lib
from sparsejax.memory import finetune
from sparsejax.models import build_lm

SEQ_LEN = 64
BATCH = 16
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LORA_RANK = 4
TOP_T = 256
BACKGROUND_DOCS = 512  # pretraining windows used as IDF documents
EVAL_BATCHES = 8
NUM_FACTS = 64


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      d_model=64, num_layers=2, num_heads=2, d_ff=256, max_len=SEQ_LEN,
      ffn={"name": "pkm", "num_keys": 64, "k": 8, "num_heads": 2, "d_key": 32},
      ffn_layers=(1,),
  ))


def facts_text(seed: int = 0, num_facts: int = NUM_FACTS) -> str:
  """Deterministic made-up facts: 'the <noun> of <name> is <name>.' from seeded syllables."""
  rng = np.random.default_rng(seed)
  syllables = ["zor", "vat", "quel", "min", "dab", "rux", "fen", "tiq", "blo", "sar", "kev",
               "nup", "wib", "lor", "gax", "yum", "pri", "dol", "hes", "cav"]
  word = lambda n: "".join(rng.choice(syllables, n))
  return "".join(f"the {word(2)} of {word(3)} is {word(2)}.\n" for _ in range(num_facts))


def windows_dataset(text: str) -> data_lib.WindowDataset:
  return data_lib.WindowDataset([{"text": text}], SEQ_LEN)


def batch_of(windows_BL: np.ndarray) -> dict[str, jax.Array]:
  targets = windows_BL[:, 1:]
  return {"inputs": jnp.asarray(windows_BL[:, :-1]), "targets": jnp.asarray(targets),
          "weights": jnp.asarray((targets != data_lib.PAD_ID).astype(np.float32))}


def make_loss(model: nn.Module) -> Callable:
  def loss_fn(params, batch):
    logits, _ = model.apply({"params": params}, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(nll * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
  return loss_fn


def make_bpb(model: nn.Module) -> Callable:
  """params, [batches] -> bits per byte over all scored targets."""
  @jax.jit
  def sums(params, batch):
    logits, _ = model.apply({"params": params}, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(nll * batch["weights"]), jnp.sum(batch["weights"])

  def bpb(params, batches):
    total, count = 0.0, 0.0
    for batch in batches:
      s, c = sums(params, batch)
      total, count = total + float(s), count + float(c)
    return total / count / math.log(2)
  return bpb


def pretrain(model, train_ds, steps: int, seed: int = 0):
  params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, SEQ_LEN), jnp.int32)))
  params = params["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(40, steps - 1), steps, 3e-4)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b2=0.95, weight_decay=0.1,
                               mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  loss_fn = make_loss(model)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  sampler = data_lib.IndexSampler(train_ds.num_windows, seed)
  for i in range(steps):
    batch = batch_of(train_ds.windows(sampler.indices(i * BATCH, BATCH)))
    params, opt_state, loss = step(params, opt_state, batch)
    if (i + 1) % 100 == 0:
      print(f"pretrain step {i + 1}: loss {float(loss):.3f}", flush=True)
  return params


LORA_TARGETS = {"attention": ("wq", "wk", "wv", "wo"), "ffn": ("wi", "wo")}


def _lora_matrix_shape(shape: tuple[int, ...], d_model: int) -> tuple[int, int]:
  """W viewed as (in, out): the model dim is `in` for input projections, `out` for outputs."""
  if shape[-1] == d_model:
    return math.prod(shape[:-1]), shape[-1]
  return shape[0], math.prod(shape[1:])


def lora_init(params, d_model: int, rank: int, seed: int = 0):
  """{layer: {module: {name: (A [in, r] ~ N(0, 1/in), B [r, out] = 0)}}} for LORA_TARGETS."""
  rng = np.random.default_rng(seed)
  lora = {}
  for layer, modules in params.items():
    for module, names in LORA_TARGETS.items():
      for name in names:
        leaf = modules.get(module, {}).get(name) if isinstance(modules, dict) else None
        if leaf is None:
          continue
        fan_in, fan_out = _lora_matrix_shape(leaf.shape, d_model)
        a = jnp.asarray(rng.normal(size=(fan_in, rank)) / math.sqrt(fan_in), jnp.float32)
        lora.setdefault(layer, {}).setdefault(module, {})[name] = (a, jnp.zeros((rank, fan_out)))
  return lora


def lora_merge(params, lora):
  """params with W + A B (reshaped to W's shape) at every LoRA target."""
  merged = jax.tree.map(lambda x: x, params)
  for layer, modules in lora.items():
    merged[layer] = dict(merged[layer])
    for module, names in modules.items():
      merged[layer][module] = dict(merged[layer][module])
      for name, (a, b) in names.items():
        w = merged[layer][module][name]
        merged[layer][module][name] = w + (a @ b).reshape(w.shape)
  return merged


def run_finetune(method: str, lr: float, model, params, fact_ds, steps: int,
                 slots: dict[str, jax.Array] | None):
  """Finetuned params after `steps` Adam steps on fact windows (the same batches for all)."""
  loss_fn = make_loss(model)
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
  if method == "lora":
    trainable = lora_init(params, model.d_model, LORA_RANK)
    objective = lambda lora, batch: loss_fn(lora_merge(params, lora), batch)
    tx = inner
  else:
    trainable = params
    objective = loss_fn
    tx = inner if method == "full" else finetune.sparse_update(
        inner, finetune.masks_for(params, slots))

  @jax.jit
  def step(trainable, opt_state, batch):
    grads = jax.grad(objective)(trainable, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  opt_state = tx.init(trainable)
  sampler = data_lib.IndexSampler(fact_ds.num_windows, 1)
  for i in range(steps):
    batch = batch_of(fact_ds.windows(sampler.indices(i * BATCH, BATCH)))
    trainable, opt_state = step(trainable, opt_state, batch)
  return lora_merge(params, trainable) if method == "lora" else trainable


def choose_slots(model, params, fact_ds, train_ds) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Top-TOP_T slots per value table by TF-IDF: fact reads vs background window frequency."""
  count = jax.jit(lambda p, tokens: finetune.access_counts(model, {"params": p}, tokens))
  facts = fact_ds.windows(np.arange(fact_ds.num_windows))[:, :-1]
  new_counts = count(params, jnp.asarray(facts))
  background_idx = data_lib.IndexSampler(train_ds.num_windows, 7).indices(0, BACKGROUND_DOCS)
  per_doc = {}
  for start in range(0, BACKGROUND_DOCS, 64):
    windows = train_ds.windows(background_idx[start : start + 64])[:, :-1]
    for table, _ in new_counts.items():  # one document per window: count each row separately
      docs = jax.vmap(lambda w: count(params, w[None])[table])(jnp.asarray(windows))
      per_doc.setdefault(table, []).append(np.asarray(docs))
  slots, info = {}, {}
  for table, counts_N in new_counts.items():
    background_DN = np.concatenate(per_doc[table])
    scores = finetune.tfidf_scores(counts_N, background_DN)
    slots[table] = finetune.top_slots(scores, TOP_T)
    info[table] = {
        "slots_read_by_facts": int(np.sum(np.asarray(counts_N) > 0)),
        "mean_background_doc_frequency": float(np.mean(np.asarray(background_DN) > 0)),
    }
  return slots, info


def markdown(rows: list[dict[str, Any]], before: dict[str, float]) -> str:
  lines = [
      f"Before finetuning: facts {before['new_bpb']:.3f} bpb, stdlib validation "
      f"{before['background_bpb']:.3f} bpb.",
      "",
      "| method | trained params | lr | facts bpb (learning) | validation bpb (forgetting) |",
      "|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['trained_params']:,} | {r['lr']:g} | {r['new_bpb']:.3f} "
        f"({r['new_bpb'] - before['new_bpb']:+.3f}) | {r['background_bpb']:.3f} "
        f"({r['background_bpb'] - before['background_bpb']:+.3f}) |"
    )
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrain_steps", type=int, default=600)
  parser.add_argument("--finetune_steps", type=int, default=100)
  parser.add_argument("--out", default=claims.RESULTS_DIR)
  args = parser.parse_args()
  clock = time.perf_counter()
  model = build_lm(model_config(), vocab_size=data_lib.VOCAB_SIZE)
  train_ds = data_lib.load_windows("python_stdlib", "train", SEQ_LEN)
  eval_ds = data_lib.load_windows("python_stdlib", "validation", SEQ_LEN)
  background_eval = [
      {k: jnp.asarray(v) for k, v in b.items()}
      for b in data_lib.eval_batches(eval_ds, BATCH, EVAL_BATCHES)
  ]
  fact_ds = windows_dataset(facts_text())
  fact_eval = [batch_of(fact_ds.windows(np.arange(i, min(i + BATCH, fact_ds.num_windows))))
               for i in range(0, fact_ds.num_windows, BATCH)]
  bpb = make_bpb(model)

  params = pretrain(model, train_ds, args.pretrain_steps)
  before = {"new_bpb": bpb(params, fact_eval), "background_bpb": bpb(params, background_eval)}
  print(f"pretrained in {time.perf_counter() - clock:.0f} s: {before}", flush=True)
  slots, slot_info = choose_slots(model, params, fact_ds, train_ds)
  lora_params = sum(a.size + b.size for a, b in jax.tree.leaves(
      lora_init(params, model.d_model, LORA_RANK), is_leaf=lambda x: isinstance(x, tuple)))
  trained = {"full": sum(x.size for x in jax.tree.leaves(params)), "lora": lora_params,
             "sparse_memory": sum(TOP_T * params_at(params, t).shape[1] for t in slots)}
  rows = []
  for method in ("full", "lora", "sparse_memory"):
    for lr in LEARNING_RATES:
      tuned = run_finetune(method, lr, model, params, fact_ds, args.finetune_steps, slots)
      row = {"method": method, "lr": lr, "trained_params": int(trained[method]),
             "new_bpb": bpb(tuned, fact_eval), "background_bpb": bpb(tuned, background_eval)}
      if method == "sparse_memory":  # check: nothing but the chosen rows moved
        moved = jax.tree.map(lambda a, b: int(np.sum(np.any(np.asarray(a) != np.asarray(b),
                                                            axis=tuple(range(1, a.ndim))))
                                              if a.ndim else int(a != b)), tuned, params)
        row["rows_changed"] = int(sum(jax.tree.leaves(moved)))
      print(row, flush=True)
      rows.append(row)
  result = {
      "config": {"model": model_config().to_dict(), "pretrain_steps": args.pretrain_steps,
                 "finetune_steps": args.finetune_steps, "batch": BATCH, "seq_len": SEQ_LEN,
                 "top_t": TOP_T, "lora_rank": LORA_RANK, "background_docs": BACKGROUND_DOCS,
                 "num_facts": NUM_FACTS, "fact_bytes": len(facts_text())},
      "before": before, "slots": slot_info, "rows": rows,
      "wall_s": time.perf_counter() - clock,
  }
  table = markdown(rows, before)
  claims.write_results(args.out, "memory_finetune", result, table, default=float)
  print(table)
  print(f"wall {result['wall_s']:.0f} s")


def params_at(params, path: str):
  node = params
  for name in path.split("/"):
    node = node[name]
  return node


if __name__ == "__main__":
  main()
