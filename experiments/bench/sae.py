"""TopK SAE training step on CPU, fp32: the decoder as a dense matmul vs a sparse gather of k rows.

`python -m experiments.bench sae [--json FILE] [--repeats N] [--quick]`

Each case is one jitted `jax.value_and_grad` of the same loss, mean((x_hat - x)^2), w.r.t. all
four parameters (W_enc [D, N], b_enc [N], W_dec [N, D], b_dec [D]) of a TopK SAE with
D = 256, N = 8192 latents, k = 32, T = 4096 tokens (`--quick`: D = 16, N = 512, k = 4, T = 64);
the cases are timed interleaved (round-robin).

* `topk_dense_decode` (the baseline, what a user writes in plain JAX): pre = x W_enc + b_enc,
  `lax.top_k`, the k ReLU'd values scattered into a dense [T, N] latent matrix,
  x_hat = acts W_dec + b_dec. Autodiff then runs three more [T, N] x [N, D]-sized matmuls.
* `topk_sparse_decode`: `sparsejax.ops.topk_encode` (the same dense score matmul, a blocked exact
  top-k, an O(T k D) backward) and `sparsejax.ops.gather_decode` (O(T k D) both ways).
* `sparse_encoder_forward`: `topk_encode`'s forward alone (score matmul + top-k), the part of
  `topk_sparse_decode` that stays O(T N D); its `share_of_sparse` says how much of the sparse
  step it takes.
* `dense_score_matmul`: x W_enc + b_enc alone, as one [T, N] array: the baseline's first op.
  `sparse_encoder_forward` computes the same scores C tokens at a time, in cache, and ranks them.

Before timing, the two training cases' losses and gradients are checked to agree within 1e-4
(relative to each array's largest entry). Target: `topk_sparse_decode` >= 3x faster than
`topk_dense_decode`.
"""
from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench import timing
from sparsejax.ops import gather_decode, topk_encode

DESCRIPTION = ("TopK SAE fwd+bwd on CPU (D=256, N=8192, k=32, T=4096): dense [T, N] decode vs "
               "sparse gather decode")
BASELINE = "topk_dense_decode"
TARGET_SPEEDUP = 3.0
TOLERANCE = 1e-4

_FULL = {"d": 256, "n": 8192, "k": 32, "t": 4096}
_QUICK = {"d": 16, "n": 512, "k": 4, "t": 64}


def init_sae(key: jax.Array, d: int, n: int) -> dict[str, jax.Array]:
  """Unit-norm decoder rows, the encoder its transpose, zero biases (Gao et al. 2024's init)."""
  w_dec_ND = jax.random.normal(key, (n, d))
  w_dec_ND = w_dec_ND / jnp.linalg.norm(w_dec_ND, axis=1, keepdims=True)
  return {"W_enc": w_dec_ND.T, "b_enc": jnp.zeros(n), "W_dec": w_dec_ND, "b_dec": jnp.zeros(d)}


def dense_decode_loss(params: dict[str, jax.Array], x_TD: jax.Array, k: int) -> jax.Array:
  """mean((x_hat - x)^2) with the top-k latents scattered into a dense [T, N] matrix."""
  pre_TN = x_TD @ params["W_enc"] + params["b_enc"]
  vals_TK, idx_TK = jax.lax.top_k(pre_TN, k)
  rows_T1 = jnp.arange(x_TD.shape[0])[:, None]
  acts_TN = jnp.zeros_like(pre_TN).at[rows_T1, idx_TK].set(jax.nn.relu(vals_TK))
  x_hat_TD = acts_TN @ params["W_dec"] + params["b_dec"]
  return jnp.mean((x_hat_TD - x_TD) ** 2)


def sparse_decode_loss(params: dict[str, jax.Array], x_TD: jax.Array, k: int) -> jax.Array:
  """mean((x_hat - x)^2) with topk_encode and the gather decode of the k chosen rows."""
  vals_TK, idx_TK = topk_encode(x_TD, params["W_enc"], params["b_enc"], k)
  x_hat_TD = gather_decode(params["W_dec"], idx_TK, vals_TK) + params["b_dec"]
  return jnp.mean((x_hat_TD - x_TD) ** 2)


def max_relative_difference(got, want) -> float:
  """max over leaves of max|got - want| / max|want|: both cases' loss and gradients."""
  diffs = jax.tree.map(
      lambda g, w: float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)),
      got, want)
  return max(jax.tree.leaves(diffs))


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The four rows (see the module docstring), after checking the two training cases agree."""
  shape = _QUICK if quick else _FULL
  d, n, k, t = shape["d"], shape["n"], shape["k"], shape["t"]
  key_params, key_x = jax.random.split(jax.random.key(0))
  params = init_sae(key_params, d, n)
  x_TD = jax.random.normal(key_x, (t, d))
  dense = jax.value_and_grad(lambda p, x: dense_decode_loss(p, x, k))
  sparse = jax.value_and_grad(lambda p, x: sparse_decode_loss(p, x, k))
  diff = max_relative_difference(jax.jit(sparse)(params, x_TD), jax.jit(dense)(params, x_TD))
  if not diff <= TOLERANCE:
    raise AssertionError(f"sparse and dense SAE steps differ by {diff:.3g} > {TOLERANCE}")
  cases = {
      BASELINE: (dense, (params, x_TD)),
      "topk_sparse_decode": (sparse, (params, x_TD)),
      "sparse_encoder_forward": (
          lambda p, x: topk_encode(x, p["W_enc"], p["b_enc"], k), (params, x_TD)),
      "dense_score_matmul": (lambda p, x: x @ p["W_enc"] + p["b_enc"], (params, x_TD)),
  }
  rows = timing.interleaved_cases(cases, repeats=repeats)
  by_case = {row["case"]: row for row in rows}
  base_s, sparse_s = by_case[BASELINE]["median_s"], by_case["topk_sparse_decode"]["median_s"]
  label = f"T={t} D={d} N={n} k={k}"
  for row in rows:
    row["shape"] = label
    row["share_of_sparse"] = row["median_s"] / sparse_s
  speedup = base_s / sparse_s
  by_case["topk_sparse_decode"].update(
      speedup=speedup, target=TARGET_SPEEDUP, met=bool(speedup >= TARGET_SPEEDUP),
      max_rel_diff=diff)
  return rows
