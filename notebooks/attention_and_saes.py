# %% [markdown]
# # Sparse attention patterns and sparse autoencoders on the LM
#
# This notebook looks at three kinds of sparsity in a Transformer LM. First, the fixed attention
# patterns that the `block_sparse` attention layer can run (sliding window, window plus global
# tokens, strided, fixed, BigBird, per-head spans). We draw each one as a query x key mask, give
# the fraction of causal keys it keeps, and show one pattern's block layout next to its token
# mask. Second, data-dependent sparsity in the attention weights: alpha-entmax and sparsemax give
# exactly zero weight to low-scoring keys, and we count how many keys each query keeps. Third,
# sparse features of the LM itself: we harvest the residual stream of a small byte LM at a named
# site, train a TopK sparse autoencoder (SAE) on it with the experiments trainer, draw how often
# each latent fires, and print the byte contexts where a few latents fire most strongly.

# %%
# In Colab, install sparsejax from its repository first (set SPARSEJAX_REPO to your fork).
import os, subprocess, sys
if "google.colab" in sys.modules:
  repo = os.environ.get("SPARSEJAX_REPO", "git+https://github.com/sparsejax/sparsejax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", repo], check=True)
FAST = os.environ.get("SPARSEJAX_FAST") == "1"  # small settings for CI

# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments import data as data_lib
from experiments import trainer
from experiments.configs import lm_dense, sae_lm
from sparsejax import sites
from sparsejax.attention import block_sparse, entmax, patterns
from sparsejax.sae import core as sae_core
from sparsejax.sae import initializers as sae_initializers
from sparsejax.sae import metrics as sae_metrics
from sparsejax.sae.analysis import contexts

print("JAX", jax.__version__, "on", jax.default_backend())

# %% [markdown]
# ## The registered attention patterns
#
# `block_sparse.PATTERNS` maps each pattern name of the `block_sparse` attention layer to the
# pattern its fields describe; the layer intersects it with `causal()`. We build each one from a
# `BlockSparseAttention` with small fields and draw its `[T, T]` token mask (`dense_mask`, query
# rows, key columns). The title gives the attended fraction that the layer reports as a metric
# (`layout_attended_fraction`): the mean over heads and queries of the share of causal keys
# (k <= q) that the query may see; the table adds the share of the `b x b` blocks that the
# kernel visits. "spans" gives each head its own window; we draw head 0.

# %%
seq_len, attn_block = 128, 16
layer = block_sparse.BlockSparseAttention(
    d_model=48, num_heads=3, window=16, num_global=8, stride=16, summary=2, num_random=2,
    spans=(8, 32, 96), block=attn_block)
causal = patterns.causal()
registered = {name: causal & make(layer) for name, make in block_sparse.PATTERNS.items()}

fig, axes = plt.subplots(2, 4, figsize=(11, 6))
print(f"T = {seq_len}, block {attn_block}")
print(f"{'pattern':14s} {'causal keys kept':>17s} {'blocks visited':>15s}")
for ax, (name, pattern) in zip(axes.flat, registered.items()):
  layout = patterns.block_layout(pattern, seq_len, attn_block)
  fraction = block_sparse.layout_attended_fraction(layout, seq_len)
  stored = np.mean(layout.kinds != patterns.EMPTY)
  print(f"{name:14s} {fraction:17.3f} {stored:15.3f}")
  mask = np.asarray(patterns.dense_mask(pattern, seq_len)).reshape(-1, seq_len, seq_len)[0]
  ax.imshow(mask, cmap="Blues", interpolation="nearest")
  ax.set_title(f"{name}: {fraction:.2f}", fontsize=9)
  ax.set(xticks=[], yticks=[])
for ax in axes.flat[len(registered):]:
  ax.axis("off")
axes[0, 0].set_ylabel("query (keys across)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A block-sparse layout next to its token mask
#
# The kernel does not look at tokens: it walks `b x b` blocks. `block_layout` sorts each block
# of the query-block x key-block grid into empty (skipped), full (no mask needed) or partial
# (the kernel applies one of a few distinct tile masks). Below: "bigbird" as blocks on the left
# (its random key blocks are full, its window and global tokens partial), and its token mask with
# the block grid on the right.

# %%
name = "bigbird"
layout = patterns.block_layout(registered[name], seq_len, attn_block)
kinds_RC = layout.kinds.reshape(-1, *layout.kinds.shape[-2:])[0]
mask = np.asarray(patterns.dense_mask(registered[name], seq_len))
num_blocks = kinds_RC.shape[0]
print(f"{name}: {np.sum(kinds_RC == patterns.FULL)} full, "
      f"{np.sum(kinds_RC == patterns.PARTIAL)} partial, {np.sum(kinds_RC == patterns.EMPTY)} "
      f"empty of {kinds_RC.size} blocks; {len(layout.tiles) - 1} distinct partial tile masks")

fig, (ax_blocks, ax_tokens) = plt.subplots(1, 2, figsize=(9, 4.3))
image = ax_blocks.imshow(kinds_RC, cmap="Blues", vmin=0, vmax=2, interpolation="nearest")
ax_blocks.set(title="blocks: 0 empty, 1 partial, 2 full", xlabel="key block",
              ylabel="query block")
fig.colorbar(image, ax=ax_blocks, ticks=[0, 1, 2])
ax_tokens.imshow(mask, cmap="Blues", interpolation="nearest")
for edge in np.arange(1, num_blocks) * attn_block - 0.5:
  ax_tokens.axhline(edge, color="gray", linewidth=0.4)
  ax_tokens.axvline(edge, color="gray", linewidth=0.4)
ax_tokens.set(title="token mask with the block grid", xlabel="key", ylabel="query")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sparse attention weights: alpha-entmax against softmax
#
# Softmax gives every causal key some weight. alpha-entmax with alpha > 1 zeroes every key
# whose score is below a per-query threshold; sparsemax is alpha = 2. We score random queries
# against random keys (`entmax.causal_scores`, one head per alpha) and count, per query, the
# keys with nonzero weight (`entmax.attention_probs`). The histogram is over the queries of the
# second half of the sequence, which all have at least T/2 causal keys.

# %%
attn_len, head_dim = (128, 16) if FAST else (512, 32)
alphas = (1.25, 1.5, 2.0)
q_BTHK = jax.random.normal(jax.random.key(0), (1, attn_len, len(alphas), head_dim))
k_BTHK = jax.random.normal(jax.random.key(1), (1, attn_len, len(alphas), head_dim))


@jax.jit
def all_probs(q_BTHK, k_BTHK):
  scores_BHTS = entmax.causal_scores(q_BTHK, k_BTHK)
  return (entmax.attention_probs(scores_BHTS, "softmax"),
          entmax.attention_probs(scores_BHTS, "entmax", jnp.asarray(alphas)))


softmax_BHTS, entmax_BHTS = all_probs(q_BTHK, k_BTHK)
probs = {"softmax": softmax_BHTS[:, :1]}
for head, alpha in enumerate(alphas):
  probs[f"{alpha}-entmax"] = entmax_BHTS[:, head:head + 1]

print(f"T = {attn_len}; mean fraction of causal keys with nonzero weight:")
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name, probs_BHTS in probs.items():
  nonzero_T = np.asarray(jnp.sum(probs_BHTS > 0, axis=-1)).reshape(-1, attn_len)[0]
  print(f"  {name:12s} {float(entmax.attended_fraction(probs_BHTS)):.3f}")
  ax.hist(nonzero_T[attn_len // 2:], bins=np.geomspace(1, attn_len, 30), alpha=0.6, label=name)
ax.set(xscale="log", xlabel="keys with nonzero weight per query", ylabel="queries")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A TopK SAE on the LM's residual stream
#
# The LM: the README quickstart's run in `/tmp/sparsejax_lm` when it is there (and not in the
# fast CI setting); otherwise a small byte LM (`experiments/configs/lm_dense.py`, fewer steps)
# trained here. The SAE is the `sae` task of `experiments/configs/sae_lm.py`, made smaller: it
# harvests the residual stream after the middle block (site `layer_1/resid_post`, scaled so that
# E||x|| = sqrt(D)) on training windows, then trains a TopK dictionary (k latents per token, AuxK
# loss for dead latents) to reconstruct it. The eval splices the SAE's reconstruction into the
# LM and reports how much of the zero-ablation CE gap it recovers. We drive `trainer.Trainer`
# ourselves (what `trainer.train` does) to keep its task, which holds the LM, the site and the
# input scale, and the trained SAE params. With the quickstart LM, 1024 latents, k = 16 and
# 400 steps we measured FVU 0.11, no dead latents and 97 % of the CE gap recovered. (In the fast
# CI setting it is a 1-layer LM trained 10 steps and a 30-step SAE on its `layer_0` output,
# just to exercise the code path.)

# %%
quickstart_lm = "/tmp/sparsejax_lm"
if not FAST and os.path.exists(os.path.join(quickstart_lm, "config.json")):
  lm_workdir = quickstart_lm
else:
  lm_config = lm_dense.get_config()
  if FAST:
    lm_config.model.update(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=32)
    lm_config.train.update(num_steps=10, batch_size=8, seq_len=32, warmup_steps=2, log_every=10,
                           eval_every=10, eval_batches=1)
  else:
    lm_config.train.update(num_steps=150, log_every=50, eval_every=150, eval_batches=4)
  lm_config.checkpoint.every = 10**6
  lm_workdir = tempfile.mkdtemp(prefix="sae_notebook_lm_")
  lm_final = trainer.train(lm_config, lm_workdir)
  print(f"LM eval/bpb after {lm_config.train.num_steps} steps: {lm_final['eval/bpb']:.3f}")

config = sae_lm.get_config()
config.sae.lm_workdir = lm_workdir
config.sae.sites = "layer_0/resid_post" if FAST else "layer_1/resid_post"
if FAST:
  config.sae.update(harvest_tokens=4096, eval_windows=2)
  config.sae.dictionary = {"kind": "topk", "num_latents": 128, "k": 8, "dead_after_tokens": 2048}
  config.train.update(num_steps=30, batch_size=256, warmup_steps=5, log_every=10, eval_every=30,
                      eval_batches=1)
else:
  config.sae.update(harvest_tokens=2**16)
  config.sae.dictionary = {"kind": "topk", "num_latents": 1024, "k": 16,
                           "dead_after_tokens": 2**15}
  config.train.update(num_steps=400, batch_size=512, log_every=50, eval_every=400,
                      eval_batches=4)
config.checkpoint.every = 10**6
sae_trainer = trainer.Trainer(config, tempfile.mkdtemp(prefix="sae_notebook_"))
try:
  final = sae_trainer.run()
finally:
  sae_trainer.close()
task, sae_params = sae_trainer.task, sae_trainer.state["params"]
print({key: round(final[key], 3) for key in ("eval/fvu", "eval/l0", "eval/dead_fraction",
                                             "eval/ce_recovered")})

# %% [markdown]
# ## Feature density
#
# We run the LM on held-out windows, collect the same site (`sites.collect`), scale it as in
# training and encode it. The SAE's latent state (`init_state`, updated by `sae_apply`) counts
# the tokens each latent fires on; `feature_density_histogram` buckets log10 of each latent's
# firing frequency and counts the latents that never fired apart. In a TopK SAE the mean
# frequency is k / N; dense latents sit to the right, rare and dead ones to the left.

# %%
lm_config = task.lm_config
eval_windows = data_lib.load_windows(lm_config.data.name, lm_config.data.eval_split,
                                     lm_config.train.seq_len)
num_windows = 16 if FAST else 128
spread = np.linspace(0, len(eval_windows) - 1, num_windows).astype(int)  # many source files
tokens_BT = np.stack([eval_windows[i]["inputs"] for i in spread])
tokens_T = tokens_BT.reshape(-1)


@jax.jit
def encode_site(tokens_BT):
  """The SAE latents of the site's activations, and the latent state counting their firings."""
  _, captured = sites.collect(task.lm, task.lm_variables, tokens_BT, sites=task.input_sites,
                              deterministic=True)
  x_TD = captured[task.input_sites[0]].reshape(-1, task.sae_config.d_in) * task.input_scale
  _, acts_TN, _, counts = sae_core.sae_apply(sae_params, x_TD, task.sae_config,
                                             state=sae_initializers.init_state(task.sae_config))
  return acts_TN, counts


acts_TN, counts = encode_site(tokens_BT)

bins = np.arange(-5.0, 0.01, 0.25)
never_fired, counts_B = sae_metrics.feature_density_histogram(counts["fire_count"],
                                                              counts["tokens"], bins)
num_latents = task.sae_config.num_latents
print(f"{len(tokens_T)} held-out tokens, {num_latents} latents, k = {task.sae_config.k}: "
      f"{int(never_fired)} never fired; mean density "
      f"{float(np.mean(sae_metrics.firing_density(counts['fire_count'], counts['tokens']))):.4f} "
      f"(k / N = {task.sae_config.k / num_latents:.4f})")
fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.bar(bins[:-1], np.asarray(counts_B), width=np.diff(bins), align="edge", edgecolor="white")
ax.axvline(np.log10(task.sae_config.k / num_latents), color="gray", linestyle="--",
           label="log10(k / N)")
ax.set(xlabel="log10 firing frequency", ylabel="latents",
       title=f"{task.input_sites[0]}: {int(never_fired)} latents never fired")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Top-activating contexts
#
# For four latents, at 5 %, 25 %, 50 % and 75 % of the latents ranked from the most to the least
# frequent, `top_activating_contexts` returns the
# tokens where the latent fires most strongly with `window` bytes on either side. We print them
# as text, the firing byte in brackets (newlines as "⏎", PAD and EOS as "·"). The held-out
# windows are laid end to end, so a context may run from one source file into another.

# %%
def show(token_ids):
  """Bytes as printable text: newlines as ⏎, tabs as →, PAD / EOS / other control bytes as ·."""
  return "".join(chr(t) if 32 <= t < 127 else {10: "⏎", 9: "→"}.get(int(t), "·")
                 for t in np.asarray(token_ids))


fire_count_N = np.asarray(counts["fire_count"])
fired = np.flatnonzero(fire_count_N)
by_count = fired[np.argsort(-fire_count_N[fired])]
shown_latents = by_count[(np.array([0.05, 0.25, 0.5, 0.75]) * len(by_count)).astype(int)]
window = 12
for latent in shown_latents:
  contexts_KW, values_K, _ = contexts.top_activating_contexts(
      acts_TN, tokens_T, int(latent), k=3 if FAST else 5, window=window, pad_id=data_lib.PAD_ID)
  print(f"latent {latent}: fires on {int(fire_count_N[latent])} of {len(tokens_T)} tokens")
  for context_W, value in zip(np.asarray(contexts_KW), np.asarray(values_K)):
    if value <= 0:  # the latent fired on fewer than k tokens
      break
    print(f"  {value:6.2f}  {show(context_W[:window])}[{show(context_W[window:window + 1])}]"
          f"{show(context_W[window + 1:])}")
