"""Monarch vs dense linear layer on CPU, fp32, forward + backward.

`python -m experiments.bench monarch [--json FILE] [--repeats N] [--quick]`

Each case is one jitted `jax.value_and_grad` of loss = sum(y * c) (c a fixed random cotangent)
w.r.t. the layer's parameters and its input x [B, I], for an I -> O layer, I = O = 4096, batch
B = 256 (`--quick`: I = O = 64, B = 8, 8 blocks):

* `dense_b256` (the baseline): y = x W + bias, W [I, O].
* `monarch_b256`: y = monarch_matmul(x, L, R) + bias with b = 64 blocks, R [64, 64, 64],
  L [64, 64, 64] (`sparsejax.masks.monarch`): 2 B I^{3/2} instead of B I^2 multiply-adds, 32x
  fewer at this shape.

Before timing, the Monarch step's loss and gradients are checked against the dense step run on
W = monarch_dense(L, R) (within 1e-4 relative to each array's largest entry); the cases are
timed interleaved (round-robin). Target: `monarch_b256` >= 4x faster than `dense_b256`.

Measured (2-core CPU shared with other jobs, load average ~9, `--repeats 5`, two runs):
dense_b256 758 / 785 ms, monarch_b256 85 / 93 ms, speedup 8.95x / 8.45x (target met).
"""
from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench import timing
from experiments.bench.sae import max_relative_difference
from sparsejax.masks.monarch import monarch_dense, monarch_matmul

DESCRIPTION = "Monarch (64 blocks) vs dense 4096->4096 layer, batch 256, fwd+bwd on CPU"
BASELINE = "dense_b256"
TARGET_SPEEDUP = 4.0
TOLERANCE = 1e-4

_FULL = {"width": 4096, "nblocks": 64, "batch": 256}
_QUICK = {"width": 64, "nblocks": 8, "batch": 8}


def dense_loss(params: dict[str, jax.Array], x_BI: jax.Array, cot_BO: jax.Array) -> jax.Array:
  """sum((x W + bias) * c)."""
  return jnp.sum((x_BI @ params["kernel"] + params["bias"]) * cot_BO)


def monarch_loss(params: dict[str, jax.Array], x_BI: jax.Array, cot_BO: jax.Array) -> jax.Array:
  """sum((monarch_matmul(x, L, R) + bias) * c)."""
  y_BO = monarch_matmul(x_BI, params["l_blocks"], params["r_blocks"]) + params["bias"]
  return jnp.sum(y_BO * cot_BO)


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The two rows (module docstring), after checking Monarch equals dense on its own matrix."""
  shape = _QUICK if quick else _FULL
  width, nblocks, batch = shape["width"], shape["nblocks"], shape["batch"]
  block = width // nblocks
  key_l, key_r, key_x, key_c, key_w = jax.random.split(jax.random.key(0), 5)
  monarch_params = {
      "l_blocks": jax.random.normal(key_l, (nblocks, block, block)) / block**0.5,
      "r_blocks": jax.random.normal(key_r, (nblocks, block, block)) / block**0.5,
      "bias": jnp.zeros(width)}
  x_BI = jax.random.normal(key_x, (batch, width))
  cot_BO = jax.random.normal(key_c, (batch, width))
  step_dense = jax.value_and_grad(dense_loss, argnums=(0, 1))
  step_monarch = jax.value_and_grad(monarch_loss, argnums=(0, 1))
  as_dense = {"kernel": monarch_dense(monarch_params["l_blocks"], monarch_params["r_blocks"]),
              "bias": monarch_params["bias"]}
  (loss_m, (grads_m, dx_m)) = jax.jit(step_monarch)(monarch_params, x_BI, cot_BO)
  (loss_d, (grads_d, dx_d)) = jax.jit(step_dense)(as_dense, x_BI, cot_BO)
  # dloss/d(L, R) by the chain rule through W = monarch_dense(L, R): <dW, dloss/dW>.
  grads_lr_via_w = jax.grad(lambda lr: jnp.vdot(monarch_dense(*lr), grads_d["kernel"]))(
      (monarch_params["l_blocks"], monarch_params["r_blocks"]))
  diff = max_relative_difference(
      (loss_m, dx_m, grads_m["bias"], grads_m["l_blocks"], grads_m["r_blocks"]),
      (loss_d, dx_d, grads_d["bias"], *grads_lr_via_w))
  if not diff <= TOLERANCE:
    raise AssertionError(f"Monarch and dense steps differ by {diff:.3g} > {TOLERANCE}")
  dense_params = {"kernel": jax.random.normal(key_w, (width, width)) / width**0.5,
                  "bias": jnp.zeros(width)}
  cases = {
      BASELINE: (step_dense, (dense_params, x_BI, cot_BO)),
      "monarch_b256": (step_monarch, (monarch_params, x_BI, cot_BO)),
  }
  rows = timing.interleaved_cases(cases, repeats=repeats)
  by_case = {row["case"]: row for row in rows}
  label = f"B={batch} I=O={width} b={nblocks}"
  for row in rows:
    row["shape"] = label
  speedup = by_case[BASELINE]["median_s"] / by_case["monarch_b256"]["median_s"]
  by_case["monarch_b256"].update(speedup=speedup, target=TARGET_SPEEDUP,
                                 met=bool(speedup >= TARGET_SPEEDUP), max_rel_diff=diff)
  return rows
