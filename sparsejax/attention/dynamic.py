"""Dynamic per-head block patterns: searched online to a target recall, and cached across steps.

`search_head_patterns` gives every head its own causal block mask: each query block keeps its
own (diagonal) block and then the key blocks of largest attention mass, as many per row as the
head needs for its rows to keep, on average, a `recall` fraction of the attention mass (AdaSpa).
A peaked head keeps few blocks, a diffuse one many. `cached_head_patterns` computes such
patterns once and reuses them for later steps, refreshing every `refresh_every` steps (SparseD).
The masks are traceable jax arrays (use them inside jit with dense masked attention);
`head_layout` turns a concrete one into the block layout `build_attention_schedule` takes.

Shape letters beyond the DESIGN legend: K the per-head dim, S key positions, R query blocks and
C key blocks (R = C = ceil(T / b)), b the positions per block.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.attention import patterns as patterns_lib

METHODS = ("exact", "pooled")


class PatternCache(NamedTuple):
  """Per-head block masks kept across steps: mask_HRC bool, and step (int32 scalar) the step
  they were searched at, -1 while empty."""
  mask_HRC: jax.Array
  step: jax.Array


class HeadPatterns(NamedTuple):
  """mask_HRC: bool, query block r of head h sees key block c; keep_H: int32 key blocks kept
  per row (fewer in the first rows, which have fewer); recall_H: the mean mass kept per row."""
  mask_HRC: jax.Array
  keep_H: jax.Array
  recall_H: jax.Array


def _check_qk(q_BHTK: jax.Array, k_BHTK: jax.Array, block: int) -> None:
  if q_BHTK.ndim != 4 or q_BHTK.shape != k_BHTK.shape:
    raise ValueError(f"q and k must both be [B, H, T, K], got shapes {q_BHTK.shape} and "
                     f"{k_BHTK.shape}")
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block={block!r} must be a positive int")


def _block_sums(x_BHTS: jax.Array, block: int, axis: int) -> jax.Array:
  """Sums of `x` over consecutive groups of `block` positions along `axis` (zero-padded)."""
  length = x_BHTS.shape[axis]
  num_blocks = -(-length // block)
  pad = [(0, 0)] * x_BHTS.ndim
  pad[axis] = (0, num_blocks * block - length)
  x = jnp.pad(x_BHTS, pad)
  shape = x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:]
  return x.reshape(shape).sum(axis + 1)


def block_attention_mass(q_BHTK: jax.Array, k_BHTK: jax.Array, block: int,
                         method: str = "exact") -> jax.Array:
  """Per head, the causal attention mass each query block puts on each key block: `[H, R, C]`.

  exact: P = softmax(q k^T / sqrt(K) + causal mask); mass_hrc = mean over the batch and the
  queries t of block r of sum_{s in block c} P_bhts. pooled (no T^2 scores; the mean-pooled
  estimate of Jiang et al. 2024, "MInference 1.0", block-sparse heads): mass_hrc = mean over the
  batch of softmax_{c <= r}(<q_r, k_c> / sqrt(K) + log n_c), q_r and k_c block means, n_c the
  keys in block c. Rows sum to 1.
  """
  _check_qk(q_BHTK, k_BHTK, block)
  if method not in METHODS:
    raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
  length, head_dim = q_BHTK.shape[2:]
  num_blocks = -(-length // block)
  q_BHTK, k_BHTK = q_BHTK.astype(jnp.float32), k_BHTK.astype(jnp.float32)
  counts_R = np.minimum(block, length - block * np.arange(num_blocks))
  if method == "exact":
    scores_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHTK) * head_dim**-0.5
    causal_TS = np.tril(np.ones((length, length), bool))
    probs_BHTS = jax.nn.softmax(jnp.where(causal_TS, scores_BHTS, -jnp.inf), axis=-1)
    mass_BHRC = _block_sums(_block_sums(probs_BHTS, block, 3), block, 2) / counts_R[:, None]
  else:
    pooled_q, pooled_k = (_block_sums(x, block, 2) / counts_R[:, None] for x in (q_BHTK, k_BHTK))
    scores_BHRC = (jnp.einsum("bhrk,bhck->bhrc", pooled_q, pooled_k) * head_dim**-0.5
                   + np.log(counts_R))
    causal_RC = np.tril(np.ones((num_blocks, num_blocks), bool))
    mass_BHRC = jax.nn.softmax(jnp.where(causal_RC, scores_BHRC, -jnp.inf), axis=-1)
  return mass_BHRC.mean(0)


def search_head_patterns(q_BHTK: jax.Array, k_BHTK: jax.Array, block: int, recall: float,
                         method: str = "exact") -> HeadPatterns:
  """Per head, the fewest key blocks per query block that keep a `recall` share of the mass.

  Row r of head h ranks its causal key blocks c <= r: the diagonal block first (every query
  then sees itself), the rest by `block_attention_mass` descending. With m_hr(j) the mass of
  row r's first j blocks, head h keeps k_h = min{k : mean_r m_hr(k) >= recall} blocks in every
  row (all r + 1 in rows with fewer), so heads differ in density but their rows are balanced.
  Xia et al. 2025, "Training-free and Adaptive Sparse Attention for Efficient Long Video
  Generation" (AdaSpa: head-adaptive block-sparse patterns searched online to a target recall).
  """
  if not 0.0 < recall <= 1.0:
    raise ValueError(f"recall={recall} must be in (0, 1]")
  mass_HRC = block_attention_mass(q_BHTK, k_BHTK, block, method)
  num_blocks = mass_HRC.shape[-1]
  row_R1, col_1C = np.arange(num_blocks)[:, None], np.arange(num_blocks)[None, :]
  priority_HRC = jnp.where(col_1C == row_R1, jnp.inf, jnp.where(col_1C < row_R1, mass_HRC, -1.0))
  order_HRC = jnp.argsort(-priority_HRC, axis=-1, stable=True)
  ranked_mass_HRC = jnp.take_along_axis(mass_HRC * (col_1C <= row_R1), order_HRC, axis=-1)
  recall_HC = jnp.cumsum(ranked_mass_HRC, axis=-1).mean(1)  # column j: keeping j + 1 blocks
  # The mean row mass of keeping every causal block is 1 up to rounding: accept a recall of 1.
  reached_HC = recall_HC >= min(recall, 1.0 - 1e-5)
  keep_H = (jnp.argmax(reached_HC, axis=-1) + 1).astype(jnp.int32)
  rank_HRC = jnp.argsort(order_HRC, axis=-1)
  mask_HRC = (rank_HRC < keep_H[:, None, None]) & (col_1C <= row_R1)
  return HeadPatterns(mask_HRC, keep_H, recall_HC[jnp.arange(len(keep_H)), keep_H - 1])


def head_layout(mask_HRC: np.ndarray, seq_len: int, block: int) -> patterns_lib.BlockLayout:
  """The block layout of `causal() & blocks(mask_HRC)` (a concrete mask, on the host), for
  `kernels.block_sparse_attention.build_attention_schedule(layout.tile, layout.tiles, T)`."""
  mask_HRC = np.asarray(mask_HRC)
  pattern = patterns_lib.causal() & patterns_lib.blocks(mask_HRC, block)
  return patterns_lib.block_layout(pattern, seq_len, block)


def init_pattern_cache(num_heads: int, num_blocks: int) -> PatternCache:
  """An empty cache: every causal block visible, step -1."""
  causal_RC = np.tril(np.ones((num_blocks, num_blocks), bool))
  return PatternCache(jnp.broadcast_to(causal_RC, (num_heads, num_blocks, num_blocks)),
                      jnp.asarray(-1, jnp.int32))


def cached_head_patterns(cache: PatternCache, q_BHTK: jax.Array, k_BHTK: jax.Array,
                         step: jax.Array, *, block: int, recall: float,
                         refresh_every: int | None = None, start_step: int = 0,
                         method: str = "exact") -> tuple[PatternCache, jax.Array]:
  """(new cache, mask `[H, R, C]` for this step): dense before `start_step`, then searched
  patterns reused across steps.

  step < start_step: every causal block (full attention), cache unchanged. Otherwise the cached
  mask, searched again (`search_head_patterns` on this step's q, k) when the cache is empty or
  step - cache.step >= refresh_every (never again when refresh_every is None). Traceable: the
  search runs under `lax.cond` only on the steps that need it.
  Wang et al. 2025, "SparseD: Sparse Attention for Diffusion Language Models" (full attention in
  the early denoising steps, head-specific patterns computed once and reused).
  """
  if refresh_every is not None and refresh_every < 1:
    raise ValueError(f"refresh_every={refresh_every} must be a positive int or None")
  step = jnp.asarray(step, jnp.int32)
  stale = (cache.step < 0) if refresh_every is None else (
      (cache.step < 0) | (step - cache.step >= refresh_every))

  def search(_):
    return PatternCache(search_head_patterns(q_BHTK, k_BHTK, block, recall, method).mask_HRC,
                        step)

  searched = jax.lax.cond(stale & (step >= start_step), search, lambda c: c, cache)
  dense_HRC = init_pattern_cache(*cache.mask_HRC.shape[:2]).mask_HRC
  return searched, jnp.where(step >= start_step, searched.mask_HRC, dense_HRC)
