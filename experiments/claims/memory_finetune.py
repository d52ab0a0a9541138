"""Claim: sparse memory finetuning learns new facts with less forgetting than full or LoRA finetuning.

  python -m experiments.claims memory_finetune [--seeds 1] [--fast]

Per seed:
1. Pretrains a small byte-level LM with a product-key memory in its last block (2 blocks,
   d_model 64, memory N = 64^2 slots, 2 heads x top-8) on the train split of the embedded
   stdlib corpus (the "background"), from the seed's init and batch order.
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
4. Measures bits per byte on the facts (learning) and on the stdlib validation split
   (forgetting) before and after. The judge compares forgetting at equal learning: the facts
   bpb that every method reaches at some learning rate, each method's least forgetting among its
   runs that reach it.

The pretraining loop and LoRA live here, not in the trainer. A full run (one seed, 600
pretraining and 100 finetuning steps) took 8.6 min wall on a busy shared 2-core CPU (3.3 min of
it pretraining); `--fast` shrinks the model to one block, pretrains 3 steps and finetunes 2 at
one rate.
Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"; Hu et al. 2021, "LoRA".
"""
import math
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
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


def model_config(fast: bool = False) -> ml_collections.ConfigDict:
  """2 blocks of width 64, a 64^2-slot memory (2 heads x top-8) in the last; `fast`: one block
  of width 32 with a 16^2-slot memory."""
  width, keys, layers = (32, 16, 1) if fast else (64, 64, 2)
  return ml_collections.ConfigDict(dict(
      d_model=width, num_layers=layers, num_heads=2, d_ff=4 * width, max_len=SEQ_LEN,
      ffn={"name": "pkm", "num_keys": keys, "k": 8, "num_heads": 2, "d_key": width // 2},
      ffn_layers=(layers - 1,),
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
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed),
                                             jnp.zeros((1, SEQ_LEN), jnp.int32)))
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


def choose_slots(model, params, fact_ds, train_ds, top_t: int = TOP_T,
                 background_docs: int = BACKGROUND_DOCS
                 ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Top-`top_t` slots per value table by TF-IDF: fact reads vs how many of `background_docs`
  pretraining windows read each slot."""
  count = jax.jit(lambda p, tokens: finetune.access_counts(model, {"params": p}, tokens))
  facts = fact_ds.windows(np.arange(fact_ds.num_windows))[:, :-1]
  new_counts = count(params, jnp.asarray(facts))
  background_idx = data_lib.IndexSampler(train_ds.num_windows, 7).indices(0, background_docs)
  per_doc = {}
  for start in range(0, background_docs, 64):
    windows = train_ds.windows(background_idx[start : start + 64])[:, :-1]
    for table, _ in new_counts.items():  # one document per window: count each row separately
      docs = jax.vmap(lambda w: count(params, w[None])[table])(jnp.asarray(windows))
      per_doc.setdefault(table, []).append(np.asarray(docs))
  slots, info = {}, {}
  for table, counts_N in new_counts.items():
    background_DN = np.concatenate(per_doc[table])
    scores = finetune.tfidf_scores(counts_N, background_DN)
    slots[table] = finetune.top_slots(scores, top_t)
    info[table] = {
        "slots_read_by_facts": int(np.sum(np.asarray(counts_N) > 0)),
        "mean_background_doc_frequency": float(np.mean(np.asarray(background_DN) > 0)),
    }
  return slots, info


METHODS = ("full", "lora", "sparse_memory")
PRETRAIN_STEPS = 600
FINETUNE_STEPS = 100
# --fast: pretrain / finetune steps, learning rates, slots, background windows, eval batches.
FAST = {"pretrain_steps": 3, "finetune_steps": 2, "learning_rates": (1e-2,), "top_t": 16,
        "background_docs": 64, "eval_batches": 1}


def run_settings(fast: bool) -> dict[str, Any]:
  """Steps, learning rates, slots, background windows and eval batches of a run."""
  return dict(FAST) if fast else {
      "pretrain_steps": PRETRAIN_STEPS, "finetune_steps": FINETUNE_STEPS,
      "learning_rates": LEARNING_RATES, "top_t": TOP_T, "background_docs": BACKGROUND_DOCS,
      "eval_batches": EVAL_BATCHES}


def run_seed(seed: int, fast: bool) -> tuple[dict, dict, list[dict]]:
  """(before, slot info, one row per method and learning rate) from one pretrained LM."""
  settings = run_settings(fast)
  clock = time.perf_counter()
  model = build_lm(model_config(fast), vocab_size=data_lib.VOCAB_SIZE)
  train_ds = data_lib.load_windows("python_stdlib", "train", SEQ_LEN)
  eval_ds = data_lib.load_windows("python_stdlib", "validation", SEQ_LEN)
  background_eval = [{k: jnp.asarray(v) for k, v in b.items()}
                     for b in data_lib.eval_batches(eval_ds, BATCH, settings["eval_batches"])]
  fact_ds = windows_dataset(facts_text())
  fact_eval = [batch_of(fact_ds.windows(np.arange(i, min(i + BATCH, fact_ds.num_windows))))
               for i in range(0, fact_ds.num_windows, BATCH)]
  bpb = make_bpb(model)

  params = pretrain(model, train_ds, settings["pretrain_steps"], seed)
  before = {"new_bpb": bpb(params, fact_eval), "background_bpb": bpb(params, background_eval)}
  print(f"seed {seed} pretrained in {time.perf_counter() - clock:.0f} s: {before}", flush=True)
  slots, slot_info = choose_slots(model, params, fact_ds, train_ds, settings["top_t"],
                                  settings["background_docs"])
  lora_params = sum(a.size + b.size for a, b in jax.tree.leaves(
      lora_init(params, model.d_model, LORA_RANK), is_leaf=lambda x: isinstance(x, tuple)))
  trained = {"full": sum(x.size for x in jax.tree.leaves(params)), "lora": lora_params,
             "sparse_memory": sum(settings["top_t"] * params_at(params, t).shape[1]
                                  for t in slots)}
  rows = []
  for method in METHODS:
    for lr in settings["learning_rates"]:
      tuned = run_finetune(method, lr, model, params, fact_ds, settings["finetune_steps"], slots)
      row = {"method": method, "lr": lr, "seed": seed, "trained_params": int(trained[method]),
             "new_bpb": bpb(tuned, fact_eval), "background_bpb": bpb(tuned, background_eval)}
      if method == "sparse_memory":  # check: nothing but the chosen rows moved
        moved = jax.tree.map(lambda a, b: int(np.sum(np.any(np.asarray(a) != np.asarray(b),
                                                            axis=tuple(range(1, a.ndim))))
                                              if a.ndim else int(a != b)), tuned, params)
        row["rows_changed"] = int(sum(jax.tree.leaves(moved)))
      print(row, flush=True)
      rows.append(row)
  return before, slot_info, rows


def run(seeds: Sequence[int], fast: bool) -> dict:
  """Every seed's before / slots / rows (see the module docstring) and the settings."""
  config = {"model": model_config(fast).to_dict(), **run_settings(fast), "batch": BATCH,
            "seq_len": SEQ_LEN, "lora_rank": LORA_RANK, "num_facts": NUM_FACTS,
            "fact_bytes": len(facts_text())}
  payload = {"config": config, "before": [], "slots": [], "rows": []}
  for seed in seeds:
    before, slot_info, rows = run_seed(seed, fast)
    payload["before"].append({"seed": seed, **before})
    payload["slots"].append({"seed": seed, **slot_info})
    payload["rows"] += rows
  return payload


def forgetting_at_equal_learning(rows: list[dict], before: dict) -> tuple[float, dict[str, float]]:
  """(L, {method: least validation-bpb increase among its runs with facts bpb <= L}) for one
  seed's rows, L = the largest of the methods' best facts bpb (a level every method reaches)."""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  level = max(min(r["new_bpb"] for r in rows if r["method"] == m) for m in methods)
  return level, {m: min(r["background_bpb"] - before["background_bpb"] for r in rows
                        if r["method"] == m and r["new_bpb"] <= level) for m in methods}


def _per_seed(payload: dict) -> tuple[list[float], dict[str, list[float]]]:
  """(L per seed, {method: forgetting at L per seed})."""
  levels, forgetting = [], {}
  for before in payload["before"]:
    rows = [r for r in payload["rows"] if r["seed"] == before["seed"]]
    level, by_method = forgetting_at_equal_learning(rows, before)
    levels.append(level)
    for method, value in by_method.items():
      forgetting.setdefault(method, []).append(value)
  return levels, forgetting


def _signed(values: Sequence[float]) -> str:
  """`claims.fmt` with a + on a non-negative mean."""
  return ("+" if np.mean(values) >= 0 else "") + claims.fmt(values)


def table(payload: dict) -> str:
  """Per method and learning rate: facts and validation bpb (change from before), mean ± std."""
  before = {b["seed"]: b for b in payload["before"]}
  cells: dict[tuple[str, float], dict[str, list[float]]] = {}
  for r in payload["rows"]:
    cell = cells.setdefault((r["method"], r["lr"]), {"params": r["trained_params"], "new": [],
                                                     "dnew": [], "bg": [], "dbg": []})
    base = before[r["seed"]]
    cell["new"].append(r["new_bpb"])
    cell["dnew"].append(r["new_bpb"] - base["new_bpb"])
    cell["bg"].append(r["background_bpb"])
    cell["dbg"].append(r["background_bpb"] - base["background_bpb"])
  rows = [[m, f"{c['params']:,}", f"{lr:g}", f"{claims.fmt(c['new'])} ({_signed(c['dnew'])})",
           f"{claims.fmt(c['bg'])} ({_signed(c['dbg'])})"]
          for (m, lr), c in cells.items()]
  levels, forgetting = _per_seed(payload)
  return (f"Before finetuning: facts {claims.fmt([b['new_bpb'] for b in payload['before']])} bpb, "
          f"stdlib validation {claims.fmt([b['background_bpb'] for b in payload['before']])} bpb."
          "\n\n" + claims.markdown_table(
              ["method", "trained params", "lr", "facts bpb (learning)",
               "validation bpb (forgetting)"], rows)
          + f"\n\nAt equal learning (facts bpb <= {claims.fmt(levels)}), the least forgetting: "
          + ", ".join(f"{m} {_signed(v)}" for m, v in forgetting.items()) + " validation bpb.")


def judge(payload: dict) -> tuple[str, str]:
  """Sparse memory forgets less than LoRA and than full at equal learning: yes if both gaps
  exceed the seed spread and hold in every seed, partly if either holds on average, no
  otherwise."""
  levels, forgetting = _per_seed(payload)
  sparse = forgetting["sparse_memory"]
  holds, clear = [], []
  for other in ("lora", "full"):
    (mean_s, std_s), (mean_o, std_o) = claims.mean_std(sparse), claims.mean_std(forgetting[other])
    holds.append(mean_s < mean_o)
    clear.append(mean_o - mean_s > std_s + std_o
                 and all(s < o for s, o in zip(sparse, forgetting[other])))
  reproduced = "yes" if all(clear) else "partly" if any(holds) else "no"
  return reproduced, (
      f"At equal learning (facts bpb <= {claims.fmt(levels)}, {len(levels)} seed(s)) sparse "
      f"memory finetuning changed validation bpb by {_signed(sparse)} against LoRA's "
      f"{_signed(forgetting['lora'])} and full finetuning's {_signed(forgetting['full'])}.")


def plot(payload: dict, path: str) -> None:
  """Validation bpb increase (forgetting) against facts bpb (learning), one line per method and
  seed through its learning rates."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(5, 3.5))
  colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green")))
  for before in payload["before"]:
    for method in METHODS:
      rows = [r for r in payload["rows"] if r["seed"] == before["seed"] and r["method"] == method]
      ax.plot([r["new_bpb"] for r in rows],
              [r["background_bpb"] - before["background_bpb"] for r in rows], "o-",
              color=colours[method], markersize=4,
              label=method if before is payload["before"][0] else None)
  ax.set_xlabel("facts bpb after finetuning (learning)")
  ax.set_ylabel("validation bpb increase (forgetting)")
  ax.set_title("Learning vs forgetting, one point per learning rate", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def params_at(params, path: str):
  node = params
  for name in path.split("/"):
    node = node[name]
  return node



CLAIM = claims.Claim(
    name="memory_finetune",
    title="Sparse memory finetuning vs LoRA vs full finetuning",
    source="Lin et al. 2025, Continual Learning via Sparse Memory Finetuning; Hu et al. 2021, LoRA",
    statement="Finetuning only the memory-layer value rows that the new data reads unusually often "
              "(TF-IDF against pretraining) learns new facts with far less forgetting of the "
              "pretraining data than full finetuning or LoRA.",
    setup="A 2-block width-64 byte LM with a 64^2-slot product-key memory (2 heads x top-8) in "
          "its last block, pretrained 600 steps on the stdlib corpus, then finetuned 100 Adam "
          "steps on 64 made-up facts at five learning rates (1e-3 to 0.1) three ways: every "
          "parameter, rank-4 LoRA on the attention and dense-FFN matrices, and the top-256 "
          "TF-IDF memory rows only. Learning: facts bpb; forgetting: stdlib validation bpb "
          "increase; compared at the facts bpb every method reaches.",
    expected="sparse memory finetuning forgets less than LoRA, which forgets less than full "
             "finetuning, at equal learning",
    run=run, table=table, judge=judge, plot=plot, default_seeds=1, minutes=9)
