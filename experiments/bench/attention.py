"""CPU block-sparse attention, fp32, forward + backward, against dense causal attention.

`python -m experiments.bench attention [--json FILE] [--repeats N] [--quick]`
(`python -m experiments.bench attention_decode ...` runs only the two decode cases)

B = 1, H = 8 heads of K = 64, L = 8192, 128 x 128 blocks (R = 64 block rows); `--quick`: H = 2
heads of 16, L = 512, 16 x 16 blocks (R = 32, so that 10 % still covers the diagonal). Every
case is one jitted call returning the output and the gradients of q, k and v for a cotangent
equal to the output.

* `dense_L{L}` (baseline): `jax.nn.dot_product_attention(q, k, v, is_causal=True)`, the faster
  of the two dense causal attentions a user writes on CPU (the other, einsum + `jnp.where`
  mask + `jax.nn.softmax` + einsum, measured ~1.2x slower at L = 8192).
* `bsa_d{N}_L{L}`: `kernels.block_sparse_attention.block_sparse_attention` (implementation
  "auto": the XLA path on CPU) with each head keeping N % of the R (R + 1) / 2 causal blocks:
  the R diagonal blocks (so every query sees itself) and a uniformly random choice of the
  blocks below them, round(N / 100 R (R + 1) / 2) in all, drawn per head; the token mask is
  `causal() & blocks(mask)`. bsa_d100 keeps every causal block.

Extra columns: `density` (of the causal blocks), `stored_blocks` (Z, all heads),
`speedup` = dense time / case time from this run, and for d10, d50 and d100 the `target`
(dense >= 6x bsa_d10 and >= 1.5x bsa_d50; bsa_d100 <= 1.15x dense, i.e. speedup >= 1 / 1.15)
and whether it is `met`.

Decode cases, timed interleaved with each other (after the cases above): one new query per head
attending to a KV cache already filled with C = 32768 random tokens (`sparsejax.attention.
decode`), B = 1, H = 8 heads of K = 64, jitted, the cache an argument; `--quick`: H = 2 heads of
16, C = 512, budget 64, pages of 16.
* `decode_full_ctx{C}` (baseline): `decode.attend(q, cache, 0)`, softmax over all C cached keys.
* `decode_topk_ctx{C}`: `decode.attend(q, cache, 0, "pages", 2048)`: Quest page selection with
  pages of P = 32 tokens, whose key min / max summaries the cache keeps; the top 2048 / 32 = 64
  pages per head by upper-bound score, exact attention within them. It reads the summaries
  (2 C K / P values per head) and 2048 keys and values instead of C of each (pages of 16 were
  measured ~1.3x slower than 32 here: twice the summaries to read and rank).
Their `speedup` = decode_full time / case time, and the `target` decode_full >= 4x decode_topk.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from kernels.block_sparse_attention import block_sparse_attention, build_attention_schedule
from sparsejax.attention import decode
from sparsejax.attention.patterns import block_layout, blocks, causal

DESCRIPTION = ("fp32 fwd+bwd on CPU: block-sparse causal attention (H=8, K=64, L=8192, "
               "128x128 blocks) at 10/25/50/100 % of the causal blocks vs dense causal attention")
BASELINE = "dense_L8192"
DENSITIES = (0.10, 0.25, 0.50, 1.00)
# Minimum speedup (dense time / case time) per density; at 100 % "within 1.15x of dense".
TARGETS = {0.10: 6.0, 0.50: 1.5, 1.00: 1 / 1.15}

FULL = {"heads": 8, "head_dim": 64, "seq_len": 8192, "block": 128}
QUICK = {"heads": 2, "head_dim": 16, "seq_len": 512, "block": 16}
DECODE_FULL = {"heads": 8, "head_dim": 64, "context": 32768, "budget": 2048, "page": 32}
DECODE_QUICK = {"heads": 2, "head_dim": 16, "context": 512, "budget": 64, "page": 16}
# Minimum speedup of page-selected decode attention over full decode attention.
DECODE_TARGET = 4.0


def forward_backward(attention: Callable[..., jax.Array]) -> Callable[..., Any]:
  """attention's output and the gradients of q, k, v for a cotangent equal to it."""

  def run(q_BHTK, k_BHTK, v_BHTK):
    o_BHTK, vjp = jax.vjp(attention, q_BHTK, k_BHTK, v_BHTK)
    return o_BHTK, *vjp(o_BHTK)

  return run


def dense_causal_attention(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(K) + causal mask) v by `jax.nn.dot_product_attention` ([B, T, H, K])."""
  o_BTHK = jax.nn.dot_product_attention(*(x.swapaxes(1, 2) for x in (q_BHTK, k_BHTK, v_BHTK)),
                                        is_causal=True)
  return o_BTHK.swapaxes(1, 2)


def causal_block_mask(heads: int, num_blocks: int, density: float,
                      rng: np.random.Generator) -> np.ndarray:
  """`[H, R, R]`: per head the diagonal and random lower blocks, round(d R (R + 1) / 2) in all."""
  num_causal = num_blocks * (num_blocks + 1) // 2
  kept_below = round(density * num_causal) - num_blocks
  if kept_below < 0:
    raise ValueError(f"density={density} keeps fewer blocks than the {num_blocks} diagonal ones")
  rows, cols = np.tril_indices(num_blocks, -1)
  mask = np.zeros((heads, num_blocks, num_blocks), bool)
  mask[:, np.arange(num_blocks), np.arange(num_blocks)] = True
  for head in range(heads):
    chosen = rng.choice(rows.size, kept_below, replace=False)
    mask[head, rows[chosen], cols[chosen]] = True
  return mask


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The dense row, one block-sparse row per density, then the two decode rows (see the module
  docstring)."""
  return run_block_sparse(repeats, quick) + run_decode(repeats, quick)


def run_block_sparse(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The dense row and one block-sparse row per density, timed interleaved."""
  shape = QUICK if quick else FULL
  heads, seq_len, block = shape["heads"], shape["seq_len"], shape["block"]
  rng = np.random.default_rng(0)
  q_BHTK, k_BHTK, v_BHTK = (
      jnp.asarray(rng.normal(size=(1, heads, seq_len, shape["head_dim"])), jnp.float32)
      for _ in range(3))
  cases = {f"dense_L{seq_len}": (forward_backward(dense_causal_attention),
                                 (q_BHTK, k_BHTK, v_BHTK))}
  extra = {f"dense_L{seq_len}": {"density": 1.0}}
  for density in DENSITIES:
    mask_HRR = causal_block_mask(heads, seq_len // block, density, rng)
    layout = block_layout(causal() & blocks(mask_HRR, block), seq_len, block)
    schedule = build_attention_schedule(layout.tile, layout.tiles, seq_len)
    name = f"bsa_d{round(density * 100)}_L{seq_len}"
    cases[name] = (forward_backward(_scheduled(schedule)), (q_BHTK, k_BHTK, v_BHTK))
    extra[name] = {"density": density, "stored_blocks": schedule.blocks.num_blocks}
  rows = timing.interleaved_cases(cases, repeats=repeats)
  dense_s = rows[0]["median_s"]
  for row in rows:
    row.update(extra[row["case"]], shape=f"B=1 H={heads} K={shape['head_dim']} L={seq_len} "
               f"b={block}", speedup=dense_s / row["median_s"])
    target = TARGETS.get(row["density"]) if row["case"].startswith("bsa") else None
    if target is not None:
      row.update(target=target, met=bool(row["speedup"] >= target))
  return rows


def _scheduled(schedule) -> Callable[..., jax.Array]:
  return lambda q, k, v: block_sparse_attention(q, k, v, schedule)


def filled_cache(heads: int, head_dim: int, context: int, page: int,
                 rng: np.random.Generator) -> decode.KVCache:
  """A one-layer, batch-1 KV cache of `context` slots, all filled with normal keys and values,
  with the page summaries of pages of `page` slots."""
  cache = decode.init_cache(1, 1, heads, context, head_dim, page_size=page)
  k_BHTK, v_BHTK = (jnp.asarray(rng.normal(size=(1, heads, context, head_dim)), jnp.float32)
                    for _ in range(2))
  return decode.extend(cache, 0, k_BHTK, v_BHTK)


def run_decode(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """decode_full and decode_topk (Quest pages) for one token, timed interleaved."""
  shape = DECODE_QUICK if quick else DECODE_FULL
  heads, context, budget = shape["heads"], shape["context"], shape["budget"]
  rng = np.random.default_rng(1)
  cache = filled_cache(heads, shape["head_dim"], context, shape["page"], rng)
  q_BHK = jnp.asarray(rng.normal(size=(1, heads, shape["head_dim"])), jnp.float32)
  full, topk = f"decode_full_ctx{context}", f"decode_topk_ctx{context}"
  rows = timing.interleaved_cases({
      full: (lambda q, c: decode.attend(q, c, 0)[0], (q_BHK, cache)),
      topk: (lambda q, c: decode.attend(q, c, 0, "pages", budget)[0], (q_BHK, cache)),
  }, repeats=repeats)
  full_s = rows[0]["median_s"]
  for row in rows:
    row.update(shape=f"B=1 H={heads} K={shape['head_dim']} C={context}",
               selection="full" if row["case"] == full else f"pages P={shape['page']}",
               budget=context if row["case"] == full else budget,
               speedup=full_s / row["median_s"])
  rows[1].update(target=DECODE_TARGET, met=bool(rows[1]["speedup"] >= DECODE_TARGET))
  return rows
