# %% [markdown]
# # Sparse kernels and sparse attention patterns
#
# This notebook checks sparsejax's two sparse matmul kernels against dense math and times one
# of them. The block-sparse matmul stores only the nonzero blocks of a weight. The grouped
# matmul (`gmm`, the dropless-MoE kernel) gives each group of rows its own weight. We compare
# both with dense references, then time the block-sparse matmul against a dense matmul as the
# block density grows. After that we draw the attention sparsity patterns in
# `sparsejax.attention.patterns` (causal, sliding window, strided, fixed, BigBird, per-head
# spans, top-k blocks) as token masks and block masks, and print the fraction of (query, key)
# pairs each one attends. On CPU the kernels use their XLA implementation. On TPU and GPU,
# `implementation="auto"` picks the Pallas kernels.

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

from experiments.bench import timing
from experiments.bench.kernels import forward_backward, random_block_mask, random_group_sizes
from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul, densify_blocks
from kernels.gmm import gmm, gmm_reference, tgmm, tgmm_reference
from sparsejax.attention import patterns

print("JAX", jax.__version__, "on", jax.default_backend())

# %% [markdown]
# ## Block-sparse matmul against dense
#
# W `[K, N]` is split into a grid of `b x b` blocks. A boolean block mask says which blocks
# exist. `build_block_schedule` turns the mask into the index lists the kernel walks, and
# `blocks_Zkn` holds the Z stored blocks. We compare y = x W and both of its gradients with
# the dense matmul of the densified W (`densify_blocks`).

# %%
rng = np.random.default_rng(0)
size, block = 128, 32
mask_RC = random_block_mask(size // block, 0.4, rng)
schedule = build_block_schedule(mask_RC)
x_MK = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
blocks_Zkn = jnp.asarray(rng.normal(size=(schedule.num_blocks, block, block)), jnp.float32)

sparse_out = forward_backward(block_sparse_matmul)(x_MK, blocks_Zkn, schedule)
dense_y, dense_vjp = jax.vjp(
    lambda x, b: x @ densify_blocks(b, schedule), x_MK, blocks_Zkn)
dense_out = (dense_y, *dense_vjp(dense_y))
print(f"block mask {mask_RC.shape}, {schedule.num_blocks} stored blocks "
      f"(density {schedule.density:.2f})")
for name, got, want in zip(("y", "dx", "dblocks"), sparse_out, dense_out):
  rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  print(f"  {name:8s} max relative error vs dense: {rel:.1e}")

# %% [markdown]
# ## Grouped matmul against dense
#
# Rows are sorted by group, and group g multiplies its rows by its own `rhs[g]`.
# `gmm_reference` is the dense one-hot version, and `jax.lax.ragged_dot` is JAX's own grouped
# matmul. `tgmm` is the weight gradient, dw[g] = sum of lhs[m]^T grad[m] over the rows m in
# group g.

# %%
num_rows, contract, out_dim, groups = 256, 32, 48, 6
lhs_MK = jnp.asarray(rng.normal(size=(num_rows, contract)), jnp.float32)
rhs_GKN = jnp.asarray(rng.normal(size=(groups, contract, out_dim)), jnp.float32)
grad_MN = jnp.asarray(rng.normal(size=(num_rows, out_dim)), jnp.float32)
group_sizes_G = jnp.asarray(random_group_sizes(num_rows, groups, rng))
print("group sizes:", np.asarray(group_sizes_G).tolist())

checks = {
    "gmm vs dense": (gmm(lhs_MK, rhs_GKN, group_sizes_G),
                     gmm_reference(lhs_MK, rhs_GKN, group_sizes_G)),
    "gmm vs ragged_dot": (gmm(lhs_MK, rhs_GKN, group_sizes_G),
                          jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G)),
    "tgmm vs dense": (tgmm(lhs_MK, grad_MN, group_sizes_G),
                      tgmm_reference(lhs_MK, grad_MN, group_sizes_G)),
}
for name, (got, want) in checks.items():
  rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  print(f"  {name:18s} max relative error: {rel:.1e}")

# %% [markdown]
# ## Speed against density
#
# Forward y = x W at M = K = N = `size`, with a random block mask at each density, timed
# against the dense matmul of the same shape. `timing.interleaved_cases` compiles every case
# first, then runs them in turn for several rounds so that changes in machine load hit all
# cases alike. Each point is the median, and the bars span the minimum to the maximum. On CPU,
# the XLA implementation switches to the densified matmul above 80 % density.

# %%
bench_size, bench_block, repeats = (256, 64, 2) if FAST else (2048, 128, 5)
densities = (0.1, 0.25, 0.5, 1.0) if FAST else (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
x_bench = jnp.asarray(rng.normal(size=(bench_size, bench_size)), jnp.float32)
w_bench = jnp.asarray(rng.normal(size=(bench_size, bench_size)), jnp.float32)
cases = {"dense": (jnp.matmul, (x_bench, w_bench))}
for density in densities:
  sched = build_block_schedule(random_block_mask(bench_size // bench_block, density, rng))
  blocks = jnp.asarray(rng.normal(size=(sched.num_blocks, bench_block, bench_block)), jnp.float32)
  cases[density] = (block_sparse_matmul, (x_bench, blocks, sched))
rows = {row["case"]: row for row in timing.interleaved_cases(cases, repeats=repeats)}

dense_s = rows.pop("dense")["median_s"]
print(f"M = K = N = {bench_size}, {bench_block}x{bench_block} blocks, dense {dense_s * 1e3:.2f} ms")
print(f"{'density':>8s} {'median ms':>10s} {'speedup':>8s}")
for density, row in rows.items():
  print(f"{density:8.2f} {row['median_s'] * 1e3:10.2f} {dense_s / row['median_s']:8.2f}")

ms = np.array([[r["median_s"], r["min_s"], r["max_s"]] for r in rows.values()]) * 1e3
fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.errorbar(list(rows), ms[:, 0], yerr=[ms[:, 0] - ms[:, 1], ms[:, 2] - ms[:, 0]],
            marker="o", capsize=3, label="block_sparse_matmul")
ax.axhline(dense_s * 1e3, color="gray", linestyle="--", label="dense matmul")
ax.set(xlabel="block density", ylabel="forward time (ms)",
       title=f"{bench_size}^3, {bench_block}x{bench_block} blocks, {jax.default_backend()}")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sparse attention patterns
#
# A `Pattern` decides which keys each query may attend to. `dense_mask` gives its `[L, L]`
# token mask. `block_mask` cuts the mask into `b x b` blocks and reports which blocks hold at
# least one allowed pair (*visible*, the blocks a block-sparse attention kernel must visit)
# and which hold only allowed pairs (*full*, the blocks that need no mask). The LM patterns
# are combined with `causal()` using `&`; BigBird is an encoder pattern and stays
# bidirectional. `per_head_spans` and `topk_blocks` give each head
# its own mask; below we show one head of each. `topk_blocks` chooses key blocks from pooled
# query/key scores, here computed on random q and k.

# %%
seq_len, attn_block = 128, 16
q_BHTK = jax.random.normal(jax.random.key(0), (1, 1, seq_len, 16))
k_BHTK = jax.random.normal(jax.random.key(1), (1, 1, seq_len, 16))
causal = patterns.causal()
shown = {
    "causal": causal,
    "sliding window 16": causal & patterns.sliding_window(16),
    "strided 16": causal & patterns.strided(16),
    "fixed 16, 2": causal & patterns.fixed(16, 2),
    "bigbird": patterns.bigbird(window=8, num_global=8, num_random=2, block=attn_block),
    "per-head spans (head 1 of 8, 32, 128)": causal & patterns.per_head_spans([8, 32, 128]),
    "top-3 blocks": causal & patterns.topk_blocks(q_BHTK, k_BHTK, attn_block, 3),
}


def first_head(mask):
  """The [L, L] (or [R, C]) mask of the pattern's head shown in the figure."""
  mask = np.asarray(mask)
  return mask[1] if mask.ndim == 3 else mask.reshape(mask.shape[-2:])


fig, axes = plt.subplots(2, len(shown), figsize=(2.6 * len(shown), 5.6))
print(f"L = {seq_len}, block {attn_block}; fractions of all L^2 pairs / of all blocks "
      "(per-head patterns: mean over heads)")
print(f"{'pattern':40s} {'attended':>9s} {'visible blk':>12s} {'full blk':>9s}")
for column, (name, pattern) in enumerate(shown.items()):
  token = np.asarray(patterns.dense_mask(pattern, seq_len))
  visible, full = patterns.block_mask(pattern, seq_len, attn_block)
  print(f"{name:40s} {token.mean():9.3f} {np.mean(visible):12.3f} {np.mean(full):9.3f}")
  axes[0, column].imshow(first_head(token), cmap="Blues", interpolation="nearest")
  axes[0, column].set_title(name, fontsize=8)
  axes[1, column].imshow(first_head(visible).astype(int) + first_head(full), cmap="Blues",
                         vmin=0, vmax=2, interpolation="nearest")
for ax in axes.flat:
  ax.set(xticks=[], yticks=[])
axes[0, 0].set_ylabel("token mask (query x key)")
axes[1, 0].set_ylabel("blocks: light partial, dark full")
fig.tight_layout()
plt.show()
