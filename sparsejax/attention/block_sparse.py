"""Causal self-attention restricted to a static sparsity pattern, run as block-sparse attention.

The layer builds, at trace time on the host, the block layout of `causal() & pattern` for the
input's length (`sparsejax.attention.patterns`), turns it into an `AttentionSchedule` and calls
`kernels.block_sparse_attention.block_sparse_attention`, whose cost follows the stored blocks.

Shape letters beyond the DESIGN legend: K is the per-head dim (d_model / num_heads), R the
blocks per sequence, b the positions per block.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention import block_sparse_attention, build_attention_schedule
from sparsejax.attention import patterns as patterns_lib
from sparsejax.auxiliary import Aux
from sparsejax.models.layers import check_attention_fields, project_out, project_qkv
from sparsejax.registry import ATTENTIONS
from sparsejax.sites import Site

# pattern name -> the (non-causal) pattern of a layer's fields; the layer adds `causal() &`.
PATTERNS: dict[str, Callable[["BlockSparseAttention"], patterns_lib.Pattern]] = {
    "causal": lambda layer: patterns_lib.causal(),
    "window": lambda layer: patterns_lib.sliding_window(layer.window),
    "window_global": lambda layer: (patterns_lib.sliding_window(layer.window)
                                    | patterns_lib.global_tokens(layer.num_global)),
    "strided": lambda layer: patterns_lib.strided(layer.stride),
    "fixed": lambda layer: patterns_lib.fixed(layer.stride, layer.summary),
    "bigbird": lambda layer: patterns_lib.bigbird(layer.window, layer.num_global,
                                                  layer.num_random, layer.block, layer.seed),
    "spans": lambda layer: patterns_lib.per_head_spans(layer.spans),
}


def layout_attended_fraction(layout: patterns_lib.BlockLayout, seq_len: int) -> float:
  """Mean over heads and queries of the fraction of causal keys attended: mean_{h,t} n_ht / (t + 1).

  n_ht counts the keys query t of head h sees under a causal layout (computed from its tiles).
  """
  tile_HRC = layout.tile.reshape((-1,) + layout.tile.shape[-2:])
  seen_Ub = layout.tiles.sum(-1)
  seen_HRCb = np.where(tile_HRC[..., None] >= 0, seen_Ub[np.maximum(tile_HRC, 0)], 0)
  seen_HT = seen_HRCb.sum(2).reshape(tile_HRC.shape[0], -1)[:, :seq_len]
  return float(np.mean(seen_HT / np.arange(1, seq_len + 1)))


@ATTENTIONS.register("block_sparse")
class BlockSparseAttention(nn.Module):
  """Multi-head causal self-attention over a static sparsity pattern, block-sparse.

  q, k, v = x W_q, x W_k, x W_v with W_*: D -> H x K, K = D / H (RoPE on q and k when
  positions == "rope"); o_h = softmax(q_h k_h^T / sqrt(K) + M_h) v_h with M_h,ts = 0 where
  `causal() & pattern` allows (t, s) for head h and -inf elsewhere; y = concat_h(o_h) W_o.
  Same params as `CausalSelfAttention` (wq, wk, wv, wo): with pattern="causal" it computes the
  same function. Patterns (`PATTERNS`): "causal"; "window" (the last `window` keys);
  "window_global" (window plus the first `num_global` tokens, Longformer); "strided" and
  "fixed" (`stride`, `summary`; Child et al. 2019); "bigbird" (window, num_global, num_random
  blocks of `block` drawn with `seed`; Zaheer et al. 2020); "spans" (head h sees its last
  spans[h] keys; Fu et al. 2024, MoA). Blocks of `block` positions; `implementation` as in
  `block_sparse_attention`. aux metrics: "attended_fraction" (mean over heads and queries of
  the fraction of causal keys attended). No dropout: `deterministic` is accepted for the layer
  contract. Site (`sparsejax.sites`) "heads": o_BTHK, the per-head outputs before W_o.
  Child et al. 2019, "Generating Long Sequences with Sparse Transformers".
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  dtype: Any = jnp.float32
  rope_max_wavelength: float = 10_000.0
  pattern: str = "window_global"
  window: int = 128
  num_global: int = 16
  stride: int = 128
  summary: int = 16
  num_random: int = 2
  spans: tuple[int, ...] = ()
  block: int = 64
  seed: int = 0
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    self._check_fields()
    seq_len = x_BTD.shape[1]
    layout = patterns_lib.block_layout(patterns_lib.causal() & PATTERNS[self.pattern](self),
                                       seq_len, self.block)
    tile_HRC = np.broadcast_to(layout.tile, (self.num_heads,) + layout.tile.shape[-2:])
    schedule = build_attention_schedule(tile_HRC, layout.tiles, seq_len)
    q_BTHK, k_BTHK, v_BTHK = project_qkv(self, x_BTD)
    o_BHTK = block_sparse_attention(*(x.swapaxes(1, 2) for x in (q_BTHK, k_BTHK, v_BTHK)),
                                    schedule, implementation=self.implementation)
    o_BTHK = Site(name="heads")(o_BHTK.swapaxes(1, 2))
    fraction = layout_attended_fraction(layout, seq_len)
    metrics = {"attended_fraction": jnp.asarray(fraction, jnp.float32)}
    return project_out(self, o_BTHK), {"losses": {}, "metrics": metrics}

  def _check_fields(self) -> None:
    check_attention_fields(self.d_model, self.num_heads, self.positions)
    if self.pattern not in PATTERNS:
      raise ValueError(f"pattern={self.pattern!r}; allowed: {', '.join(PATTERNS)}")
    if self.pattern == "spans" and len(self.spans) != self.num_heads:
      raise ValueError(f"spans={tuple(self.spans)} must hold one span per head "
                       f"(num_heads={self.num_heads})")
