# %% [markdown]
# # Sparse training with masks as pytrees
#
# Weight sparsity in sparsejax is a `Mask`: a pytree of boolean leaves that mirrors the params
# tree. This notebook builds a mask for LeNet-300-100, compares the per-layer densities that
# Erdős–Rényi-Kernel (ERK) and uniform distributions give at the same global budget, trains the
# MLP on scikit-learn's 8x8 digits with a static random mask, SET (random regrowth) and RigL
# (gradient regrowth) at 90 % sparsity, and draws one layer's mask before and after a regrowth
# step, with the dropped and the grown connections coloured.

# %%
# In Colab, install sparsejax from its repository first (set SPARSEJAX_REPO to your fork).
import os, subprocess, sys
if "google.colab" in sys.modules:
  repo = os.environ.get("SPARSEJAX_REPO", "git+https://github.com/sparsejax/sparsejax")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", repo], check=True)
FAST = os.environ.get("SPARSEJAX_FAST") == "1"  # small settings for CI

# %%
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from experiments import tasks, trainer
from experiments import optim
from experiments.claims import sparse_mlp as claim
from experiments.configs import sparse_mlp
from experiments.data import digits
from sparsejax import masks

NUM_STEPS = 60 if FAST else sparse_mlp.NUM_STEPS        # training steps per method
UPDATE_EVERY = 20 if FAST else 50                       # steps between mask updates
EVAL_EVERY = 20 if FAST else 50                         # steps between test evaluations
METHODS = ("static", "set", "rigl") if FAST else ("dense", "static", "set", "rigl")
DENSITY = 0.1                                           # 90 % sparse
SEED = 0

# %% [markdown]
# ## A mask is a pytree
#
# `make_mask` keeps a `DENSITY` fraction of the sparsified leaves (the kernels; biases stay
# dense), spread over the layers by a distribution. The mask's leaves have the params' tree
# structure and shapes, so `jax.tree.map` lines them up, and `mask.apply(params)` zeroes the
# masked weights.

# %%
model = tasks.TASKS.get("classify")(sparse_mlp.get_config("rigl")).model
params = nn.meta.unbox(model.init(jax.random.PRNGKey(SEED),
                                  jnp.zeros((1, digits.NUM_FEATURES))))["params"]
mask = masks.make_mask(params, DENSITY, "erk", key=jax.random.PRNGKey(SEED))
print(jax.tree.map(lambda m: f"{m.dtype}{list(m.shape)}", mask.leaves))
print(f"{'leaf':24s} {'structure':13s} {'kept':>7s} {'size':>7s} {'density':>8s}")
sizes = {path: leaf.size for path, leaf in mask.flat().items()}
for path, density in mask.density().items():
  print(f"{path:24s} {mask.structure_of(path):13s} {mask.nnz()[path]:7d} {sizes[path]:7d} "
        f"{density:8.3f}")
print(f"global density over the sparsified leaves: {mask.global_density():.3f}")
sparse_params = mask.apply(params)
print("exact zeros in the masked layer_0 kernel:", int(jnp.sum(sparse_params["layer_0"]["kernel"] == 0)))

# %% [markdown]
# ## ERK vs uniform densities
#
# Uniform gives every kernel the same density. ERK scales each kernel's density with
# (fan_in + fan_out) / (fan_in · fan_out), so small layers (the 100 → 10 output layer) stay
# denser and the big 64 → 300 and 300 → 100 layers carry most of the sparsity, at the same total
# number of kept weights.

# %%
kernels = ["layer_0/kernel", "layer_1/kernel", "head/kernel"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for ax, target in zip(axes, (0.1, 0.02)):
  width = 0.38
  for i, distribution in enumerate(("uniform", "erk")):
    dens = masks.layer_densities(params, target, distribution)
    x = np.arange(len(kernels)) + (i - 0.5) * width
    ax.bar(x, [dens[p] for p in kernels], width, label=distribution)
  ax.set_xticks(np.arange(len(kernels)),
                [f"{p.split('/')[0]}\n{tuple(np.shape(masks.leaves_by_path(params)[p]))}"
                 for p in kernels])
  ax.set_yscale("log")
  ax.set_title(f"global density {target:g} ({1 - target:.0%} sparse)")
axes[0].set_ylabel("layer density")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## RigL vs SET vs static on the digits MLP
#
# Each method runs `experiments/configs/sparse_mlp.py` (the same initial state, optimizer, train
# step and batch order as `python -m experiments.train`), its steps in `lax.scan` chunks of
# `EVAL_EVERY` steps, with the test accuracy after each chunk. Dynamic methods drop a
# cosine-decaying fraction (0.3 at the start) of each layer's weights every `UPDATE_EVERY` steps
# and regrow as many (the first update is at step 0): SET at random, RigL where the dense
# gradient is largest, until 75 % of training. Alongside accuracy we track the global density
# (constant: every drop is matched by a regrowth) and the fraction of the initial mask's
# connections still kept.

# %%
train, test = digits.load_digits("train"), digits.load_digits("test")
inputs, labels = jnp.asarray(train.inputs), jnp.asarray(train.labels)


def run_method(method, density=DENSITY):
  """Curves of `method` and the train state after every chunk (small bookkeeping around
  the library's train step)."""
  overrides = ({"sparsity.schedule.update_every": UPDATE_EVERY}
               if method in ("set", "rigl", "srigl") else {})
  config, = claim.seed_configs(method, density, [SEED], NUM_STEPS, overrides)
  task = tasks.TASKS.get("classify")(config)
  state, tx, schedule = claim.initial_state(config, task.model, digits.NUM_FEATURES)
  sparse = config.sparsity.enabled
  step = trainer.make_train_step(task, tx, schedule, optim.masked_params if sparse else None)
  idx_NB = claim.batch_indices(train.num_examples, SEED, NUM_STEPS, config.train.batch_size)

  def accuracy(state):
    w = optim.masked_params(state["params"], state["opt_state"]) if sparse else state["params"]
    logits, _ = task.model.apply({"params": w, **state["model_state"]}, jnp.asarray(test.inputs))
    return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.labels))

  @jax.jit
  def chunk(state, idx_CB):
    def body(state, idx_B):
      batch = {"inputs": inputs[idx_B], "targets": labels[idx_B],
               "weights": jnp.ones(idx_B.shape, jnp.float32)}
      return step(state, batch)[0], None
    state, _ = jax.lax.scan(body, state, idx_CB)
    return state, accuracy(state)

  first = ({p: m for p, m in masks.get_mask(state["opt_state"]).flat().items()
            if p.endswith("kernel")} if sparse else None)
  curve = {"step": [], "accuracy": [], "mask_step": [], "density": [], "overlap": []}
  states = {0: state}
  for start in range(0, NUM_STEPS, EVAL_EVERY):
    state, acc = chunk(state, jnp.asarray(idx_NB[start:start + EVAL_EVERY]))
    states[int(state["step"])] = state
    curve["step"].append(int(state["step"]))
    curve["accuracy"].append(float(acc))
  for s, saved in states.items() if sparse else ():
    now = masks.get_mask(saved["opt_state"])
    kept = sum(np.sum(np.asarray(now.flat()[p]) & np.asarray(first[p])) for p in first)
    curve["mask_step"].append(s)
    curve["density"].append(now.global_density())
    curve["overlap"].append(kept / sum(np.sum(np.asarray(first[p])) for p in first))
  return curve, states


clock = time.perf_counter()
runs = {}
for method in METHODS:
  runs[method] = run_method(method)
  print(f"{method:7s} test accuracy {runs[method][0]['accuracy'][-1]:.3f}")
print(f"training took {time.perf_counter() - clock:.1f} s")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for method, (curve, _) in runs.items():
  style = dict(ls="--", color="k") if method == "dense" else {}
  axes[0].plot(curve["step"], curve["accuracy"], label=method, **style)
  if curve["density"]:
    axes[1].plot(curve["mask_step"], curve["density"], label=method)
    axes[2].plot(curve["mask_step"], curve["overlap"], label=method)
axes[0].set(title="test accuracy", xlabel="step")
axes[1].set(title="global mask density", xlabel="step", ylim=(0, 2 * DENSITY))
axes[2].set(title="initial connections still kept", xlabel="step", ylim=(0, 1.05))
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## One regrowth step, drawn
#
# RigL's mask just before an update step (after `UPDATE_EVERY` train steps) and after it: the
# mask changes only on update steps, so the mask `UPDATE_EVERY` steps later (the end of the next
# chunk, before the following update) is the one that update made. On a 40 x 40 block of the
# 300 → 100 kernel: connections kept by both masks in black, the ones the update dropped
# (smallest magnitudes) in red, the ones it grew (largest dense gradients) in green.

# %%
_, rigl_states = runs["rigl"]
layer = "layer_1/kernel"
before = np.asarray(masks.get_mask(rigl_states[UPDATE_EVERY]["opt_state"]).flat()[layer])
after = np.asarray(masks.get_mask(rigl_states[2 * UPDATE_EVERY]["opt_state"]).flat()[layer])
print(f"{layer}: kept {before.sum()} -> {after.sum()}, dropped {(before & ~after).sum()}, "
      f"grown {(~before & after).sum()}")

code = np.zeros(before.shape, int)          # 0: absent in both
code[before & after] = 1                    # kept
code[before & ~after] = 2                   # dropped
code[~before & after] = 3                   # grown
block = (slice(0, 40), slice(0, 40))
colours = ListedColormap(["white", "black", "tab:red", "tab:green"])
fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
axes[0].imshow(before[block], cmap=ListedColormap(["white", "black"]), vmin=0, vmax=1)
axes[0].set_title(f"before (step {UPDATE_EVERY})")
axes[1].imshow(code[block], cmap=colours, vmin=0, vmax=3)
axes[1].set_title("after: kept / dropped (red) / grown (green)")
for ax in axes:
  ax.set(xlabel="output unit", ylabel="input unit")
plt.tight_layout()
plt.show()
