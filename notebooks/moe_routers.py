# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of MoE routers
#
# A mixture-of-experts layer is only as good as its router: the function that decides which
# expert each token goes to, with what gate, and which tokens are dropped when an expert is
# full. This notebook routes the *same* tokens (the bytes of a Python source file, embedded
# and scored by one random router) with six of sparsejax's pure routing functions: top-k
# (Switch / GShard), expert choice, hash layers, BASE (balanced assignment), Soft MoE and
# threshold (dynamic-k) routing. It compares their expert load, drop rates under a capacity
# limit and gate-value distributions, and finally trains a small MoE language model with the
# experiments trainer and shows how its per-layer expert load evolves during training.

# %%
# In Colab, install sparsejax from its repository first (set SPARSEJAX_REPO to your fork).
import os, subprocess, sys
if "google.colab" in sys.modules:
  repo = os.environ.get("SPARSEJAX_REPO", "git+https://github.com/sparsejax/sparsejax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", repo], check=True)
FAST = os.environ.get("SPARSEJAX_FAST") == "1"  # small settings for CI

# %%
import functools
import inspect
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments import metrics as metrics_lib
from experiments import trainer
from experiments.configs import moe_lm
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from sparsejax.moe import soft

# %% [markdown]
# ## The tokens and the router
#
# The tokens are the bytes of `sparsejax/moe/routing.py` itself, so their frequencies are
# realistically skewed (spaces, `e`, `t`, ...). Each byte gets a random embedding `x_TD`, and a
# random linear router `W_DE` scores it: `logits_TE = x_TD @ W_DE`. Frequent bytes share one
# embedding, so a learned-free router already sends many tokens to the same experts, which is
# exactly the imbalance the routers below handle differently.

# %%
NUM_TOKENS = 512 if FAST else 4096
NUM_EXPERTS, D_MODEL, K = 8, 64, 2

token_ids_T = np.frombuffer(inspect.getsource(routing).encode(), np.uint8)[:NUM_TOKENS]
token_ids_T = jnp.asarray(token_ids_T, jnp.int32)
key_embed, key_router, key_phi = jax.random.split(jax.random.PRNGKey(0), 3)
embed_VD = jax.random.normal(key_embed, (256, D_MODEL))
x_TD = embed_VD[token_ids_T]
router_DE = jax.random.normal(key_router, (D_MODEL, NUM_EXPERTS)) / np.sqrt(D_MODEL)
logits_TE = x_TD @ router_DE
print(f"{NUM_TOKENS} tokens, {len(np.unique(token_ids_T))} distinct bytes, "
      f"{NUM_EXPERTS} experts, d_model {D_MODEL}")

# %% [markdown]
# ## Route the same tokens six ways
#
# Every logit router returns `(DispatchPlan, aux)`: the plan says which expert and buffer slot
# each (token, choice) pair uses, its gate and whether it is kept.
#
# * **top-k**: each token takes its `k` highest-probability experts (dropless).
# * **expert choice**: each expert takes its `C = T k / E` favourite tokens, so load is perfectly
#   even but some tokens get no expert at all.
# * **hash**: a fixed table from token id to expert, no parameters; `make_balanced_hash_table`
#   packs ids by frequency so expected loads are even.
# * **BASE**: an exact balanced assignment (Sinkhorn prices + shortest-path repairs) maximising
#   the total router score with exactly `T / E` tokens per expert.
# * **threshold**: a token takes experts by descending probability until their mass reaches `p`
#   (at most `k`), so confident tokens use one expert and uncertain ones more; with `p = 0.5`
#   these tokens use about 2 experts on average, like top-2, but from 1 to 3 each.
# * **Soft MoE** has no discrete plan: each expert slot takes a softmax-weighted mix of all
#   tokens, and each token combines all slots. Its "load" here is the combine weight mass per
#   expert.

# %%
freqs_V = np.bincount(np.asarray(token_ids_T), minlength=256)
jit = lambda fn, **kwargs: jax.jit(functools.partial(fn, **kwargs))  # compile each router once
plans = {
    "top-k (k=2)": jit(routing.route_top_k, k=K, renormalize=True)(logits_TE),
    "expert choice": jit(routing.route_expert_choice, k=K)(logits_TE),
    "hash (random)": routing.route_hash(
        token_ids_T, table_V=jnp.asarray(routing.make_hash_table(256, NUM_EXPERTS)),
        num_experts=NUM_EXPERTS),
    "hash (balanced)": routing.route_hash(
        token_ids_T, table_V=jnp.asarray(routing.make_balanced_hash_table(freqs_V, NUM_EXPERTS)),
        num_experts=NUM_EXPERTS),
    "BASE": jit(routing.route_balanced)(logits_TE),
    "threshold (p=0.5)": jit(routing.route_threshold, k=NUM_EXPERTS, p=0.5)(logits_TE),
}

SLOTS_PER_EXPERT = 2
phi_DS = jax.random.normal(key_phi, (D_MODEL, NUM_EXPERTS * SLOTS_PER_EXPERT))
dispatch_GMS, combine_GMS = soft.soft_weights(x_TD[None], phi_DS, jnp.asarray(10.0))
soft_combine_TES = combine_GMS[0].reshape(NUM_TOKENS, NUM_EXPERTS, SLOTS_PER_EXPERT)
threshold_plan, _ = plans["threshold (p=0.5)"]
print("threshold routing, tokens using 0, 1, 2, ... experts:",
      np.bincount(np.asarray(jnp.sum(threshold_plan.keep_TK, axis=1))))

# %% [markdown]
# ## Expert load
#
# Load of expert `e` = the fraction of kept (token, choice) pairs it receives (`group_sizes`),
# ideal `1 / E`. Top-k and random hashing inherit the byte skew; expert choice, BASE and the
# frequency-balanced hash table even it out by construction.

# %%
loads = {name: np.asarray(plan_lib.group_sizes(plan)) / np.sum(plan.keep_TK)
         for name, (plan, _) in plans.items()}
loads["Soft MoE"] = np.asarray(jnp.sum(soft_combine_TES, axis=(0, 2))) / NUM_TOKENS

fig, axes = plt.subplots(1, len(loads), figsize=(3 * len(loads), 2.8), sharey=True)
for ax, (name, load_E) in zip(axes, loads.items()):
  ax.bar(np.arange(NUM_EXPERTS), load_E, color="tab:blue")
  ax.axhline(1 / NUM_EXPERTS, color="k", ls="--", lw=1)
  ax.set_title(f"{name}\nmax/mean {load_E.max() * NUM_EXPERTS:.2f}", fontsize=9)
  ax.set_xlabel("expert")
axes[0].set_ylabel("fraction of routed pairs")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Drop rates under a capacity limit
#
# Token-choice plans are dropless; `apply_capacity` gives every expert a buffer of
# `C = ceil(T k cf / E)` slots and drops the pairs that arrive after it is full (the token then
# passes through the residual only). Expert choice never overflows but leaves some tokens
# without any expert; BASE fills every buffer exactly.

# %%
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
rows = []
for name, (plan, aux) in plans.items():
  pairs_per_token = float(np.sum(plan.keep_TK)) / NUM_TOKENS
  row = {"router": name, "experts/token": pairs_per_token}
  uncovered = 1.0 - float(np.mean(np.any(plan.keep_TK, axis=1)))
  for cf in CAPACITY_FACTORS:
    if plan.capacity is None:
      capacity = plan_lib.compute_capacity(NUM_TOKENS, pairs_per_token, NUM_EXPERTS, cf)
      capped = plan_lib.apply_capacity(plan, capacity)
      row[f"drop@cf={cf}"] = 1.0 - float(np.sum(capped.keep_TK)) / float(np.sum(plan.keep_TK))
    else:
      row[f"drop@cf={cf}"] = 0.0  # capacity is part of the router itself
  row["tokens w/o expert"] = uncovered
  rows.append(row)

header = list(rows[0])
print(" | ".join(f"{h:>17}" for h in header))
for row in rows:
  print(" | ".join(f"{v:>17}" if isinstance(v, str) else f"{v:>17.3f}" for v in row.values()))

fig, ax = plt.subplots(figsize=(8, 3))
width = 0.8 / len(CAPACITY_FACTORS)
for i, cf in enumerate(CAPACITY_FACTORS):
  ax.bar(np.arange(len(rows)) + i * width, [row[f"drop@cf={cf}"] for row in rows], width,
         label=f"capacity factor {cf}")
ax.set_xticks(np.arange(len(rows)) + width, [row["router"] for row in rows], fontsize=8)
ax.set_ylabel("dropped fraction of pairs")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Gate values
#
# What the expert outputs are multiplied by. A token's two renormalised top-2 gates sum to 1,
# so their histogram mirrors around 0.5; expert choice gates are raw softmax probabilities
# (often small); hash gates are all 1; BASE uses `sigmoid(logit)`; threshold gates are the
# probabilities it took; Soft MoE spreads each token over all slots with small combine weights.

# %%
gates = {name: np.asarray(plan.gate_TK)[np.asarray(plan.keep_TK)]
         for name, (plan, _) in plans.items()}
gates["Soft MoE"] = np.asarray(soft_combine_TES).reshape(-1)

fig, axes = plt.subplots(1, len(gates), figsize=(3 * len(gates), 2.6))
for ax, (name, gate) in zip(axes, gates.items()):
  ax.hist(gate, bins=30, range=(0, 1), color="tab:orange")
  ax.set_title(name, fontsize=9)
  ax.set_xlabel("gate")
axes[0].set_ylabel("pairs")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Training a small MoE LM
#
# `experiments/configs/moe_lm.py` is a top-2, 8-expert byte LM with a Switch load-balance loss.
# The trainer logs every MoE layer's `expert_load_E` to `metrics.jsonl`; below it is read back
# and drawn as one heatmap per layer (experts x steps). With the balance loss the early load
# spikes (one expert taking a third of the tokens) flatten out within the first ~50 steps.
# (In the fast CI setting this is a 3-step run of a tiny model, just to exercise the code path.)

# %%
config = moe_lm.get_config()
if FAST:
  config.model.update(d_model=16, num_layers=1, num_heads=1, d_ff=16, max_len=16)
  config.model.ffn.num_experts = 4
  config.train.update(num_steps=3, batch_size=2, seq_len=16, warmup_steps=1, log_every=1,
                      eval_every=3, eval_batches=1)
else:
  config.train.update(num_steps=300, batch_size=16, log_every=10, eval_every=100,
                      eval_batches=4)
config.train.plot_expert_load = False  # we draw the heatmap ourselves from metrics.jsonl
config.checkpoint.every = 10**6
workdir = tempfile.mkdtemp(prefix="moe_routers_")
final = trainer.train(config, workdir)
print(f"eval/bpb after {config.train.num_steps} steps: {final['eval/bpb']:.3f}")

# %%
records = [r for r in metrics_lib.read_metrics(workdir) if "train/layer_0/ffn/expert_load_E" in r]
steps = [r["step"] for r in records]
num_layers = config.model.num_layers
fig, axes = plt.subplots(1, num_layers, figsize=(4 * num_layers, 3), sharey=True)
for layer, ax in enumerate(np.atleast_1d(axes)):
  load_SE = np.array([r[f"train/layer_{layer}/ffn/expert_load_E"] for r in records])
  image = ax.imshow(load_SE.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                    extent=(steps[0] - 0.5, steps[-1] + 0.5, load_SE.shape[1] - 0.5, -0.5))
  ax.set_title(f"layer {layer}: expert load", fontsize=9)
  ax.set_xlabel("step")
  fig.colorbar(image, ax=ax)
np.atleast_1d(axes)[0].set_ylabel("expert")
fig.tight_layout()
plt.show()
