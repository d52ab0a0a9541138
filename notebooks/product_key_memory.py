# %% [markdown]
# # Product-key memory: lookup, slot usage and sparse memory finetuning
#
# A product-key memory (Lample et al. 2019) holds N = P² value rows but scores only 2P sub-keys
# per query: it splits the query in two halves, takes the top-k sub-keys of each half, combines
# the k × k candidate sums into an exact top-k over all N slots, and reads the chosen rows as a
# softmax-weighted embedding bag. This notebook walks through one lookup with the pure functions
# of `sparsejax.memory.pkm`, measures slot usage and access entropy on random and LM-like
# (clustered, Zipf-distributed) queries, and shows the idea of sparse memory finetuning
# (Lin et al. 2025, `sparsejax.memory.finetune`): rank slots by TF-IDF of their reads on new data
# against background data and train only those rows. It ends with the measured
# learning-vs-forgetting results of the `memory_finetune` claim.

# %%
# In Colab, install sparsejax from its repository first (set SPARSEJAX_REPO to your fork).
import os, subprocess, sys
if "google.colab" in sys.modules:
  repo = os.environ.get("SPARSEJAX_REPO", "git+https://github.com/sparsejax/sparsejax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", repo], check=True)
FAST = os.environ.get("SPARSEJAX_FAST") == "1"  # small settings for CI

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from experiments import claims
from sparsejax.memory import finetune, pkm

np.set_printoptions(precision=2, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. One lookup, step by step
#
# A tiny memory: one head, P = 4 sub-keys per half (N = 16 slots), query dim Q = 4 (halves of
# A = 2), top k = 3. Keys have shape (H, 2, P, A): `keys[h, 0]` scores the first query half,
# `keys[h, 1]` the second.

# %%
P, A, K, D = 4, 2, 3, 3
key_keys, key_query, key_values = jax.random.split(jax.random.PRNGKey(0), 3)
keys_H2PA = jax.random.normal(key_keys, (1, 2, P, A))
query_BHQ = jax.random.normal(key_query, (1, 1, 2 * A))
values_ND = jax.random.normal(key_values, (P * P, D))
print("query", query_BHQ.shape, " keys", keys_H2PA.shape, " values", values_ND.shape)

s1_BHP, s2_BHP = pkm.half_scores(query_BHQ, keys_H2PA)
print("sub-key scores, first half  s1 =", np.asarray(s1_BHP[0, 0]))
print("sub-key scores, second half s2 =", np.asarray(s2_BHP[0, 0]))

# %% [markdown]
# Step 2: the top-k of each half. Only these k sub-keys per half can take part in a top-k slot.

# %%
t1, i1 = jax.lax.top_k(s1_BHP[0, 0], K)
t2, i2 = jax.lax.top_k(s2_BHP[0, 0], K)
print("top-k of s1: sub-keys", np.asarray(i1), "scores", np.asarray(t1))
print("top-k of s2: sub-keys", np.asarray(i2), "scores", np.asarray(t2))

# %% [markdown]
# Step 3: combine. With both lists sorted, rank pair (a, b) is beaten by the (a+1)(b+1) pairs
# above-left of it, so only the pairs with (a+1)(b+1) ≤ k are candidates
# (`pkm.candidate_pairs`); the top-k of their sums is the exact top-k over all N slots, and the
# slot of pair (a, b) is `i1[a] * P + i2[b]`.

# %%
first_R, second_R = pkm.candidate_pairs(K)
print(f"{'rank a':>6} {'rank b':>6} {'slot':>5} {'t1_a + t2_b':>12}")
for a, b in zip(first_R, second_R):
  print(f"{a:>6} {b:>6} {int(i1[a]) * P + int(i2[b]):>5} {float(t1[a] + t2[b]):>12.3f}")

scores_BHK, idx_BHK = pkm.pkm_lookup(query_BHQ, keys_H2PA, K)
full_N = (s1_BHP[0, 0][:, None] + s2_BHP[0, 0][None, :]).reshape(-1)  # every slot, for checking
print("pkm_lookup: slots", np.asarray(idx_BHK[0, 0]), "scores", np.asarray(scores_BHK[0, 0]))
print("brute force over all N slots:", np.argsort(-np.asarray(full_N))[:K])

# %% [markdown]
# Step 4: the read. The k scores go through a softmax and the chosen value rows are summed with
# those weights (`pkm.embedding_bag`); `pkm.pkm_read` does steps 1-4 for every head at once.

# %%
weights_BHK = jax.nn.softmax(scores_BHK, axis=-1)
out_BD = pkm.embedding_bag(values_ND, idx_BHK[:, 0], weights_BHK[:, 0])
read_BD, read_idx, read_weights = pkm.pkm_read(query_BHQ, keys_H2PA, values_ND, K)
print("weights", np.asarray(weights_BHK[0, 0]))
print("embedding_bag out", np.asarray(out_BD[0]), " pkm_read out", np.asarray(read_BD[0]))

# %% [markdown]
# The same lookup on a larger memory (P = 16, N = 256, k = 8), drawn: left, the score of every
# slot as a P × P grid (the lookup never forms it) with the k-of-each-half rows and columns
# shaded and the chosen slots circled; right, the k × k rank grid with the candidate pairs
# (a+1)(b+1) ≤ k and the pairs that won.

# %%
P2, A2, K2 = 16, 8, 8
kk, kq = jax.random.split(jax.random.PRNGKey(11))
keys2 = jax.random.normal(kk, (1, 2, P2, A2))
query2 = jax.random.normal(kq, (1, 1, 2 * A2))
s1, s2 = (np.asarray(s[0, 0]) for s in pkm.half_scores(query2, keys2))
_, idx2 = pkm.pkm_lookup(query2, keys2, K2)
chosen = np.asarray(idx2[0, 0])
top1, top2 = np.argsort(-s1)[:K2], np.argsort(-s2)[:K2]
rank1 = {int(s): r for r, s in enumerate(top1)}
rank2 = {int(s): r for r, s in enumerate(top2)}

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
image = ax0.imshow(s1[:, None] + s2[None, :], cmap="viridis")
for i in top1:
  ax0.axhspan(i - 0.5, i + 0.5, color="white", alpha=0.2)
for j in top2:
  ax0.axvspan(j - 0.5, j + 0.5, color="white", alpha=0.2)
ax0.scatter(chosen % P2, chosen // P2, s=80, facecolors="none", edgecolors="red", linewidths=2)
ax0.set(title=f"score of all N={P2 * P2} slots; red: top-{K2}", xlabel="second-half sub-key i2",
        ylabel="first-half sub-key i1")
fig.colorbar(image, ax=ax0, shrink=0.8)
grid = np.zeros((K2, K2))
fa, fb = pkm.candidate_pairs(K2)
grid[fa, fb] = 1
for slot in chosen:
  grid[rank1[int(slot // P2)], rank2[int(slot % P2)]] = 2
ax1.imshow(grid, cmap=plt.matplotlib.colors.ListedColormap(["#eeeeee", "#9ecae1", "#de2d26"]))
ax1.set(title=f"rank pairs: {len(fa)} candidates (blue) of {K2 * K2}, winners red",
        xlabel="rank b in top-k of s2", ylabel="rank a in top-k of s1")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Slot usage and access entropy
#
# How evenly does a memory get read? `pkm.slot_histograms` counts reads and softmax weight mass
# per slot; `pkm.histogram_stats` turns them into the fraction of slots read at least once
# (memory usage), the normalised entropy of the weight mass (1 = every slot equally) and the
# largest share a single slot gets. Two query sets against the same random keys: isotropic
# Gaussian queries, and "LM-like" queries drawn around a few hundred centres whose frequencies
# follow Zipf's law, as hidden states of frequent and rare tokens would.

# %%
P3 = 32 if FAST else 128
N3, H3, Q3, K3 = P3 * P3, 2, 32, 8
B3 = 4096 if FAST else 65536
CENTRES = 256 if FAST else 2048
rng = np.random.default_rng(0)
keys3 = jnp.asarray(rng.normal(size=(H3, 2, P3, Q3 // 2)), jnp.float32)
random_queries = jnp.asarray(rng.normal(size=(B3, H3, Q3)), jnp.float32)
centres = rng.normal(size=(CENTRES, H3, Q3))
zipf = 1.0 / np.arange(1, CENTRES + 1)
picks = rng.choice(CENTRES, size=B3, p=zipf / zipf.sum())
lm_queries = jnp.asarray(centres[picks] + 0.3 * rng.normal(size=(B3, H3, Q3)), jnp.float32)

lookup = jax.jit(pkm.pkm_lookup, static_argnums=2)
histograms = {}
print(f"N = {N3} slots, {H3} heads x top-{K3}, {B3} queries")
print(f"{'queries':>10} {'memory_usage':>13} {'access_entropy':>15} {'top_slot_share':>15}")
for name, queries in [("random", random_queries), ("LM-like", lm_queries)]:
  scores, idx = lookup(queries, keys3, K3)
  weights = jax.nn.softmax(scores, axis=-1)
  histograms[name] = [np.asarray(h) for h in pkm.slot_histograms(idx, weights, N3)]
  stats = pkm.histogram_stats(*pkm.slot_histograms(idx, weights, N3))
  print(f"{name:>10} {float(stats['memory_usage']):>13.3f} {float(stats['access_entropy']):>15.3f}"
        f" {float(stats['top_slot_share']):>15.4f}")

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
for name, (counts, _) in histograms.items():
  ax0.plot(np.arange(1, N3 + 1), np.sort(counts)[::-1], label=name)
  ax1.hist(counts, bins=40, alpha=0.6, label=name)
ax0.set(xscale="log", yscale="log", title="reads per slot, slots sorted by reads",
        xlabel="slot rank", ylabel="reads")
ax1.set(yscale="log", title="histogram of slot reads", xlabel="reads of a slot",
        ylabel="number of slots")
ax0.legend()
ax1.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Sparse memory finetuning: which rows to train
#
# To teach a memory-layer model new facts without forgetting, sparse memory finetuning trains
# only the value rows that the new data reads *unusually* often. `finetune.tfidf_scores` ranks a
# slot by its share of the new data's reads (tf) times log((1 + D) / (1 + df)), where df counts in
# how many of D background documents it was read: a slot every document reads scores 0.
# Here the background is D batches of LM-like queries, and the new data mixes a few new centres
# with common background centres.

# %%
DOCS, DOC_LEN, TOP_T = (32, 128, 64) if FAST else (256, 256, 256)
background = lm_queries[: DOCS * DOC_LEN].reshape(DOCS, DOC_LEN, H3, Q3)
background_DN = jax.vmap(lambda q: finetune.slot_counts(lookup(q, keys3, K3)[1], N3))(background)
new_centres = rng.normal(size=(4, H3, Q3))
new_queries = np.concatenate([
    new_centres[rng.integers(0, 4, DOC_LEN)] + 0.3 * rng.normal(size=(DOC_LEN, H3, Q3)),
    np.asarray(lm_queries[-DOC_LEN:]),  # common background contexts around the new facts
])
new_N = finetune.slot_counts(lookup(jnp.asarray(new_queries, jnp.float32), keys3, K3)[1], N3)
scores_N = finetune.tfidf_scores(new_N, background_DN)
chosen_T = finetune.top_slots(scores_N, TOP_T)
df_N = np.asarray(finetune.document_frequency(background_DN))
read_by_new = np.asarray(new_N) > 0
print(f"slots read by the new data: {read_by_new.sum()} of {N3}; training the top {TOP_T}")
print(f"mean background doc frequency: all slots read by new data "
      f"{df_N[read_by_new].mean() / DOCS:.3f}, chosen slots {df_N[chosen_T].mean() / DOCS:.3f}")

# %%
mask_N = np.asarray(finetune.row_mask(N3, chosen_T))
fig, ax = plt.subplots(figsize=(6, 4.5))
jitter = rng.uniform(-0.3, 0.3, N3)
ax.scatter(np.asarray(new_N)[read_by_new & ~mask_N] + jitter[read_by_new & ~mask_N],
           df_N[read_by_new & ~mask_N], s=10, alpha=0.5, label="read by new data, not trained")
ax.scatter(np.asarray(new_N)[mask_N] + jitter[mask_N], df_N[mask_N], s=14, color="red",
           label=f"top-{TOP_T} by TF-IDF (trained)")
ax.set(xscale="symlog", xlabel="reads on the new data (tf, jittered)",
       ylabel=f"background documents reading the slot (df, of {DOCS})",
       title="TF-IDF: read by the new data, rare in the background")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# `finetune.sparse_update` wraps any optax optimizer so that only those rows move; every other row
# stays bit-identical (no weight decay, no stale Adam moments). One AdamW step on a random
# gradient:

# %%
params = {"values": jnp.asarray(rng.normal(size=(N3, 16)), jnp.float32),
          "other": jnp.ones((4,))}
masks = finetune.masks_for(params, {"values": chosen_T}, train_other=False)
optimizer = finetune.sparse_update(optax.adamw(1e-2, weight_decay=0.1), masks)
grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
updates, _ = optimizer.update(grads, optimizer.init(params), params)
new_params = optax.apply_updates(params, updates)
rows_changed = np.flatnonzero(np.any(new_params["values"] != params["values"], axis=1))
print(f"rows changed: {len(rows_changed)} (= top_t {TOP_T}); all chosen:",
      set(rows_changed.tolist()) == set(np.asarray(chosen_T).tolist()),
      "; other params unchanged:", bool(jnp.all(new_params["other"] == params["other"])))

# %% [markdown]
# ## 4. Learning vs forgetting (measured)
#
# `python -m experiments.claims memory_finetune` pretrains a small byte-level LM with a 64² slot
# memory on a stdlib corpus, then finetunes it on made-up facts with full finetuning, LoRA and
# sparse memory finetuning at five learning rates each (about 9 minutes on a 2-core CPU). We read
# its stored results: learning is the bits per byte on the facts, forgetting the bits per byte on
# the held-out corpus; lower is better on both, so the bottom left is best.

# %%
payload = claims.load_result("memory_finetune")["payload"]
before = payload["before"][0]  # the first seed's runs
seed_rows = [r for r in payload["rows"] if r["seed"] == before["seed"]]
print(f"before finetuning: facts {before['new_bpb']:.3f} bpb, "
      f"validation {before['background_bpb']:.3f} bpb")
print(f"{'method':>14} {'params':>8} {'lr':>6} {'facts bpb':>10} {'valid bpb':>10}")
for row in seed_rows:
  print(f"{row['method']:>14} {row['trained_params']:>8} {row['lr']:>6} "
        f"{row['new_bpb']:>10.3f} {row['background_bpb']:>10.3f}")

# %%
fig, ax = plt.subplots(figsize=(7, 5))
for method, colour in [("full", "tab:blue"), ("lora", "tab:orange"),
                       ("sparse_memory", "tab:green")]:
  rows = [r for r in seed_rows if r["method"] == method]
  ax.plot([r["new_bpb"] for r in rows], [r["background_bpb"] for r in rows], "o-", color=colour,
          label=f"{method} ({rows[0]['trained_params']:,} params)")
  for r in rows:
    ax.annotate(f"{r['lr']:g}", (r["new_bpb"], r["background_bpb"]), fontsize=7,
                xytext=(3, 3), textcoords="offset points")
ax.scatter([before["new_bpb"]], [before["background_bpb"]], marker="*", s=200, color="black",
           label="before finetuning", zorder=3)
ax.set(xlabel="facts bpb (learning, lower = learned more)",
       ylabel="validation bpb (forgetting, lower = forgot less)",
       title="Sparse memory finetuning: learning vs forgetting (labels: lr)")
ax.legend()
plt.tight_layout()
plt.show()
