"""Attention sparsity patterns: which keys each query sees, as token predicates and block masks.

A `Pattern` is a token-level predicate `allows(q_idx, k_idx) -> bool` over broadcast integer
positions, with a leading head axis H when it differs per head (shared patterns have none and
broadcast over heads). `a | b` allows what either allows, `a & b` what both allow.

At a block size b the [L, L] grid of (query, key) pairs is cut into [R, C] blocks,
R = C = ceil(L / b). Each pattern states, from its own definition and without visiting tokens,
whether a block is EMPTY (no pair allowed), FULL (every pair allowed) or PARTIAL; composition
takes the max (for |) or min (for &) of these kinds, which may leave a block PARTIAL that is in
fact empty or full. `block_layout` settles those by evaluating the predicate on the PARTIAL
blocks only, and collects the distinct token masks ("tiles") of the blocks a block-sparse
kernel must mask. Pairs with a position >= L do not exist: they are never allowed, and "FULL"
means every existing pair of the block is allowed.

Layouts follow FlexAttention's block masks (Dong et al. 2024, "Flex Attention: A Programming
Model for Generating Optimized Attention Kernels"): full blocks need no mask, partial blocks
apply the token predicate.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2
# Largest number of predicate values evaluated at once when settling partial blocks.
_TILE_CHUNK_ELEMENTS = 1 << 24

Array = Any  # a NumPy array, or a jax.Array for patterns built from traced scores


@dataclasses.dataclass(frozen=True, eq=False)
class Pattern:
  """Which keys each query may attend to, per head (`lead_shape` = (H,)) or shared (()).

  allows(q_idx, k_idx): bool broadcastable to lead_shape + broadcast(q_idx, k_idx).shape, True
    where the query at position q_idx may attend to the key at position k_idx.
  block_kinds(L, b): int8 `[*lead_shape, R, C]` of EMPTY / PARTIAL / FULL per block; exact for
    the constructors below, conservative (PARTIAL where unsure) for compositions.
  """
  name: str
  allows: Callable[[Array, Array], Array]
  block_kinds: Callable[[int, int], Array]
  lead_shape: tuple[int, ...] = ()

  def __or__(self, other: "Pattern") -> "Pattern":
    if not isinstance(other, Pattern):
      return NotImplemented
    lead = _combined_lead(self, other, "|")
    return Pattern(
        f"({self.name} | {other.name})",
        lambda q, k: self.allows(q, k) | other.allows(q, k),
        lambda n, size: _max(self.block_kinds(n, size), other.block_kinds(n, size)),
        lead)

  def __and__(self, other: "Pattern") -> "Pattern":
    if not isinstance(other, Pattern):
      return NotImplemented
    lead = _combined_lead(self, other, "&")
    return Pattern(
        f"({self.name} & {other.name})",
        lambda q, k: self.allows(q, k) & other.allows(q, k),
        lambda n, size: _min(self.block_kinds(n, size), other.block_kinds(n, size)),
        lead)

  def __repr__(self) -> str:
    return f"Pattern({self.name})"


class BlockMask(NamedTuple):
  """visible: a block holds at least one allowed pair; full: it holds only allowed pairs."""
  visible: Array
  full: Array


class BlockLayout(NamedTuple):
  """A pattern cut into b x b blocks, with the token masks a block-sparse kernel needs.

  kinds: int8 `[*lead, R, C]`, exact EMPTY / PARTIAL / FULL.
  tile: int32 `[*lead, R, C]`: -1 for an empty block, else the index into `tiles` of the
    block's token mask (pairs beyond L are False); tile 0 is all True.
  tiles: bool `[U, b, b]`, the U distinct token masks of the stored blocks, all-True first.
  """
  kinds: np.ndarray
  tile: np.ndarray
  tiles: np.ndarray


def _xp(*arrays: Array):
  """jax.numpy when any of `arrays` is a jax.Array (e.g. traced), else NumPy."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _max(a: Array, b: Array) -> Array:
  return _xp(a, b).maximum(a, b)


def _min(a: Array, b: Array) -> Array:
  return _xp(a, b).minimum(a, b)


def _combined_lead(a: Pattern, b: Pattern, op: str) -> tuple[int, ...]:
  try:
    return tuple(np.broadcast_shapes(a.lead_shape, b.lead_shape))
  except ValueError:
    raise ValueError(f"cannot combine {a.name} (heads {a.lead_shape}) {op} {b.name} (heads "
                     f"{b.lead_shape}): leading head shapes must match or be shared ()") from None


def _check_positive(name: str, value: int):
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")


def _intervals(seq_len: int, block: int):
  """First and last existing position of each block row ([R, 1]) and block column ([1, C])."""
  _check_positive("seq_len", seq_len)
  _check_positive("block", block)
  start = np.arange(0, seq_len, block)
  last = np.minimum(start + block, seq_len) - 1
  return start[:, None], last[:, None], start[None, :], last[None, :]


def _kinds(full: np.ndarray, empty: np.ndarray) -> np.ndarray:
  """FULL where `full`, EMPTY where `empty`, PARTIAL elsewhere, as int8."""
  return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


def _distance_kinds(seq_len: int, block: int, lo: float, hi: float) -> np.ndarray:
  """Kinds of the pattern lo <= q - k <= hi (q - k takes every value between its extremes)."""
  q0, q1, k0, k1 = _intervals(seq_len, block)
  nearest, farthest = q0 - k1, q1 - k0
  return _kinds((nearest >= lo) & (farthest <= hi), (farthest < lo) | (nearest > hi))


# ---------------------------------------------------------------------------- constructors


def causal() -> Pattern:
  """Autoregressive: a query sees itself and every earlier key, k <= q."""
  return Pattern("causal", lambda q, k: q >= k,
                 lambda n, b: _distance_kinds(n, b, 0, np.inf))


def sliding_window(window: int) -> Pattern:
  """Keys within `window` - 1 positions on either side: |q - k| < window.

  `causal() & sliding_window(w)` is the causal local window of the last w keys, self included
  (Beltagy et al. 2020, "Longformer: The Long-Document Transformer"; Child et al. 2019).
  """
  _check_positive("window", window)
  return Pattern(f"sliding_window({window})", lambda q, k: abs(q - k) < window,
                 lambda n, b: _distance_kinds(n, b, 1 - window, window - 1))


def chunked(chunk: int) -> Pattern:
  """Attention within consecutive chunks of `chunk` tokens: floor(q / c) == floor(k / c).

  Parmar et al. 2018, "Image Transformer" (local 1-D attention); the first half of Child et
  al. 2019's fixed pattern.
  """
  _check_positive("chunk", chunk)

  def kinds(seq_len, block):
    q0, q1, k0, k1 = _intervals(seq_len, block)
    first_q, last_q, first_k, last_k = q0 // chunk, q1 // chunk, k0 // chunk, k1 // chunk
    one_chunk = (first_q == last_q) & (first_k == last_k) & (first_q == first_k)
    return _kinds(one_chunk, (last_q < first_k) | (last_k < first_q))

  return Pattern(f"chunked({chunk})", lambda q, k: q // chunk == k // chunk, kinds)


def _every_stride(stride: int) -> Pattern:
  """Keys a multiple of `stride` positions away: (q - k) mod stride == 0."""

  def kinds(seq_len, block):
    q0, q1, k0, k1 = _intervals(seq_len, block)
    nearest, farthest = q0 - k1, q1 - k0
    has_multiple = (farthest // stride) * stride >= nearest
    return _kinds((stride == 1) | ((nearest == farthest) & has_multiple), ~has_multiple)

  return Pattern(f"every_stride({stride})", lambda q, k: (q - k) % stride == 0, kinds)


def strided(stride: int) -> Pattern:
  """Child et al.'s strided pattern: the last `stride` keys and every stride-th key before.

  allows(q, k) = |q - k| < stride or (q - k) mod stride == 0; `causal() & strided(l)` is
  A_i = {j <= i : i - j <= l} U {j <= i : (i - j) mod l == 0} of Child et al. 2019, "Generating
  Long Sequences with Sparse Transformers" (the union of its two heads' sets).
  """
  _check_positive("stride", stride)
  pattern = sliding_window(stride) | _every_stride(stride)
  return dataclasses.replace(pattern, name=f"strided({stride})")


def _summary_columns(stride: int, summary: int) -> Pattern:
  """Keys in the last `summary` positions of each chunk of `stride`: k mod stride >= stride - c."""

  def count_below(n):
    """Number of summary positions in [0, n)."""
    return (n // stride) * summary + np.maximum(0, n % stride - (stride - summary))

  def kinds(seq_len, block):
    q0, _, k0, k1 = _intervals(seq_len, block)
    count = count_below(k1 + 1) - count_below(k0)
    shape = (q0.shape[0], k0.shape[1])
    full, empty = count == k1 - k0 + 1, count == 0
    return _kinds(np.broadcast_to(full, shape), np.broadcast_to(empty, shape))

  return Pattern(f"summary({stride}, {summary})",
                 lambda q, k: k % stride >= stride - summary, kinds)


def fixed(stride: int, summary: int = 1) -> Pattern:
  """Child et al.'s fixed pattern: the query's chunk plus the last `summary` keys of every chunk.

  allows(q, k) = floor(q / l) == floor(k / l) or k mod l in {l - c, ..., l - 1}; with
  `causal() &` it is A_i^(1) U A_i^(2) of Child et al. 2019, "Generating Long Sequences with
  Sparse Transformers", sec. 4.3.
  """
  _check_positive("stride", stride)
  _check_positive("summary", summary)
  if summary > stride:
    raise ValueError(f"summary={summary} must be at most stride={stride}")
  pattern = chunked(stride) | _summary_columns(stride, summary)
  return dataclasses.replace(pattern, name=f"fixed({stride}, {summary})")


def global_tokens(num_global: int) -> Pattern:
  """The first `num_global` tokens see every key and every query sees them: q < g or k < g.

  Beltagy et al. 2020, "Longformer"; Zaheer et al. 2020, "Big Bird" (global tokens).
  """
  _check_positive("num_global", num_global)

  def kinds(seq_len, block):
    q0, q1, k0, k1 = _intervals(seq_len, block)
    return _kinds((q1 < num_global) | (k1 < num_global), (q0 >= num_global) & (k0 >= num_global))

  return Pattern(f"global_tokens({num_global})", lambda q, k: (q < num_global) | (k < num_global),
                 kinds)


def blocks(mask: Array, block: int) -> Pattern:
  """The pattern of an explicit block mask `[*lead, R, C]` at block size b: mask[q // b, k // b].

  Positions past the mask's R b rows or C b columns are not allowed. `mask` may be a NumPy
  array or a (traced) jax.Array; block layouts need a concrete one.
  """
  _check_positive("block", block)
  if mask.ndim < 2 or mask.dtype != bool:
    raise ValueError(f"block mask must be a bool array [..., R, C], got dtype {mask.dtype} and "
                     f"shape {mask.shape}")
  num_rows, num_cols = mask.shape[-2:]
  padded = _xp(mask).pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, 1), (0, 1)])

  def allows(q, k):
    return padded[..., _xp(q).minimum(q // block, num_rows), _xp(k).minimum(k // block, num_cols)]

  def kinds(seq_len, block_size):
    num_blocks = -(-seq_len // block_size)
    if block_size != block or num_blocks > min(num_rows, num_cols):
      return np.full(mask.shape[:-2] + (num_blocks, num_blocks), PARTIAL, np.int8)
    xp = _xp(mask)
    return xp.where(mask[..., :num_blocks, :num_blocks], FULL, EMPTY).astype(xp.int8)

  return Pattern(f"blocks({'x'.join(map(str, mask.shape))}, {block})", allows, kinds,
                 tuple(mask.shape[:-2]))


def random_blocks(num_random: int, block: int, seed: int = 0,
                  num_heads: int | None = None) -> Pattern:
  """Each query block sees `num_random` key blocks drawn uniformly from the blocks at or before it.

  Query block r draws min(num_random, r + 1) distinct key blocks among 0..r (so the pattern is
  causal at block granularity and row r's draw does not depend on L); with `num_heads`, every
  head draws its own. Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences" (random
  attention, in its blocked form).
  """
  _check_positive("num_random", num_random)
  _check_positive("block", block)
  heads = (1,) if num_heads is None else (num_heads,)
  _check_positive("num_heads", heads[0])

  def table(num_rows):
    rng = np.random.default_rng(seed)
    mask = np.zeros(heads + (num_rows, num_rows), bool)
    for row in range(num_rows):
      for head in range(heads[0]):
        mask[head, row, rng.choice(row + 1, min(num_random, row + 1), replace=False)] = True
    return mask if num_heads else mask[0]

  def allows(q, k):
    num_rows = int(max(np.max(q), np.max(k))) // block + 1
    return blocks(table(num_rows), block).allows(q, k)

  def kinds(seq_len, block_size):
    return blocks(table(-(-seq_len // block)), block).block_kinds(seq_len, block_size)

  return Pattern(f"random_blocks({num_random}, {block}, seed={seed})", allows, kinds,
                 () if num_heads is None else (num_heads,))


def bigbird(window: int, num_global: int, num_random: int, block: int, seed: int = 0) -> Pattern:
  """Big Bird: global tokens | sliding window | random key blocks.

  Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences" (ITC variant, token-level
  window and global tokens, blocked random attention).
  """
  pattern = (global_tokens(num_global) | sliding_window(window)
             | random_blocks(num_random, block, seed))
  return dataclasses.replace(pattern, name=f"bigbird({window}, {num_global}, {num_random}, "
                                          f"{block})")


def per_head(patterns: Sequence[Pattern]) -> Pattern:
  """Head h follows patterns[h]: a pattern with a leading head axis H = len(patterns)."""
  if not patterns or any(not isinstance(p, Pattern) or p.lead_shape for p in patterns):
    raise ValueError(f"per_head needs a non-empty list of shared patterns, got {patterns!r}")

  def allows(q, k):
    masks = [p.allows(q, k) for p in patterns]
    xp = _xp(*masks)
    shape = np.broadcast_shapes(*(m.shape for m in masks))
    return xp.stack([xp.broadcast_to(m, shape) for m in masks])

  def kinds(seq_len, block):
    parts = [p.block_kinds(seq_len, block) for p in patterns]
    return _xp(*parts).stack(parts)

  return Pattern(f"per_head[{', '.join(p.name for p in patterns)}]", allows, kinds,
                 (len(patterns),))


def per_head_spans(spans: Sequence[int]) -> Pattern:
  """Head h attends within its own span: |q - k| < spans[h] (with `causal() &`, the last spans[h]).

  Fu et al. 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model
  Compression" (heterogeneous per-head sliding-window spans).
  """
  return per_head([sliding_window(span) for span in spans])


def topk_blocks(q_BHTK: jax.Array, k_BHTK: jax.Array, block: int, k: int) -> Pattern:
  """Each query block sees its own block and the k - 1 earlier key blocks of highest pooled score.

  With q_r, k_c the means of the queries of block r and the keys of block c (over existing
  positions): score_rc = <q_r, k_c>; block r keeps c = r and the top k - 1 of c < r (all of
  them when r < k). A dynamic, per batch and head pattern: lead shape (B, H); traceable, e.g.
  inside jit for `dense_mask`. Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context
  LLMs"; Gao et al. 2024, "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs"
  (pooled query/key block scores).
  """
  _check_positive("block", block)
  _check_positive("k", k)
  if q_BHTK.ndim != 4 or q_BHTK.shape != k_BHTK.shape:
    raise ValueError(f"q and k must both be [B, H, T, K], got shapes {q_BHTK.shape} and "
                     f"{k_BHTK.shape}")
  num_blocks = -(-q_BHTK.shape[2] // block)
  score_BHRC = jnp.einsum("bhrk,bhck->bhrc", _pool_blocks(q_BHTK, block),
                          _pool_blocks(k_BHTK, block))
  row_R1, col_1C = np.arange(num_blocks)[:, None], np.arange(num_blocks)[None, :]
  score_BHRC = jnp.where(col_1C < row_R1, score_BHRC, -jnp.inf)
  score_BHRC = jnp.where(col_1C == row_R1, jnp.inf, score_BHRC)
  top_score_BHRk, top_BHRk = jax.lax.top_k(score_BHRC, min(k, num_blocks))
  chosen_BHRkC = (top_BHRk[..., None] == col_1C) & (top_score_BHRk[..., None] > -jnp.inf)
  return blocks(chosen_BHRkC.any(-2), block)


def _pool_blocks(x_BHTK: jax.Array, block: int) -> jax.Array:
  """Means over the existing positions of each block of `block` tokens: [B, H, R, K]."""
  length = x_BHTK.shape[2]
  num_blocks = -(-length // block)
  pad = num_blocks * block - length
  x_BHTK = jnp.pad(x_BHTK.astype(jnp.float32), [(0, 0), (0, 0), (0, pad), (0, 0)])
  sums_BHRK = x_BHTK.reshape(*x_BHTK.shape[:2], num_blocks, block, -1).sum(3)
  counts_R = np.minimum(block, length - block * np.arange(num_blocks))
  return sums_BHRK / counts_R[:, None]


# ------------------------------------------------------------------------ masks and layouts


def dense_mask(pattern: Pattern, seq_len: int) -> Array:
  """The token mask `[*lead, L, L]`: mask[..., q, k] = pattern.allows(q, k)."""
  _check_positive("seq_len", seq_len)
  positions = np.arange(seq_len)
  mask = pattern.allows(positions[:, None], positions[None, :])
  return _xp(mask).broadcast_to(mask, pattern.lead_shape + (seq_len, seq_len))


def block_mask(pattern: Pattern, seq_len: int, block: int) -> BlockMask:
  """Which b x b blocks of the [L, L] grid hold an allowed pair, and which hold only allowed ones.

  Returns `BlockMask(visible, full)`, both bool `[*lead, R, C]` with R = C = ceil(L / b); a
  block is partial where visible and not full. Pairs past L do not count.
  """
  kinds = block_layout(pattern, seq_len, block).kinds
  return BlockMask(kinds != EMPTY, kinds == FULL)


def block_layout(pattern: Pattern, seq_len: int, block: int) -> BlockLayout:
  """The exact block kinds of `pattern` at block size b and the token masks of its stored blocks.

  Evaluates the predicate only on the blocks its kinds leave PARTIAL (and on full blocks that
  hold positions past L); needs a concrete pattern (host NumPy, not traced).
  """
  kinds = pattern.block_kinds(seq_len, block)
  if isinstance(kinds, jax.core.Tracer):
    raise ValueError(f"{pattern.name} is traced (built from traced scores); block layouts are "
                     f"built on the host: call outside jit, or use dense_mask")
  kinds = np.array(np.broadcast_to(kinds, pattern.lead_shape + kinds.shape[-2:]), np.int8)
  num_blocks = kinds.shape[-1]
  ragged = np.zeros((num_blocks, num_blocks), bool)
  if seq_len % block:
    ragged[-1, :] = ragged[:, -1] = True
  where = np.nonzero((kinds == PARTIAL) | ((kinds == FULL) & ragged))
  tiles_Pbb = _evaluate_tiles(pattern, seq_len, block, where)
  valid_Pbb = _valid_tiles(seq_len, block, where[-2], where[-1])
  any_P = tiles_Pbb.any((1, 2))
  kinds[where] = _kinds(np.all(tiles_Pbb == valid_Pbb, (1, 2)), ~any_P)
  tile = np.where(kinds == EMPTY, -1, 0).astype(np.int32)
  masked_P = any_P & ~tiles_Pbb.all((1, 2))
  distinct_Ubb, inverse = _distinct_tiles(tiles_Pbb[masked_P])
  tile[tuple(w[masked_P] for w in where)] = inverse + 1
  return BlockLayout(kinds, tile, np.concatenate([np.ones((1, block, block), bool), distinct_Ubb]))


def _distinct_tiles(tiles_Pbb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The distinct tiles and, for each tile, its index among them (compared as packed bytes)."""
  packed_P = np.packbits(tiles_Pbb.reshape(tiles_Pbb.shape[0], -1), axis=1)
  packed_P = np.ascontiguousarray(packed_P).view(np.dtype((np.void, packed_P.shape[1])))[:, 0]
  _, first_U, inverse_P = np.unique(packed_P, return_index=True, return_inverse=True)
  return tiles_Pbb[first_U], inverse_P.reshape(-1)


def _valid_tiles(seq_len: int, block: int, rows_P: np.ndarray, cols_P: np.ndarray) -> np.ndarray:
  """For each block (rows_P, cols_P): which of its b x b pairs have both positions < L."""
  offsets = np.arange(block)
  q_valid = rows_P[:, None] * block + offsets < seq_len
  k_valid = cols_P[:, None] * block + offsets < seq_len
  return q_valid[:, :, None] & k_valid[:, None, :]


def _evaluate_tiles(pattern: Pattern, seq_len: int, block: int,
                    where: tuple[np.ndarray, ...]) -> np.ndarray:
  """The predicate on each block `where` (lead indices, rows, cols), pairs past L set False."""
  *lead_P, rows_P, cols_P = where
  offsets = np.arange(block)
  heads = int(np.prod(pattern.lead_shape))
  chunk = max(1, _TILE_CHUNK_ELEMENTS // (heads * block * block))
  tiles = []
  for start in range(0, rows_P.size, chunk):
    part = slice(start, start + chunk)
    q_Pb1 = (rows_P[part, None] * block + offsets)[:, :, None]
    k_P1b = (cols_P[part, None] * block + offsets)[:, None, :]
    allowed = np.broadcast_to(pattern.allows(q_Pb1, k_P1b),
                              pattern.lead_shape + (q_Pb1.shape[0], block, block))
    tiles.append(allowed[(*(i[part] for i in lead_P), np.arange(q_Pb1.shape[0]))])
  tiles_Pbb = np.concatenate(tiles) if tiles else np.zeros((0, block, block), bool)
  return tiles_Pbb & _valid_tiles(seq_len, block, rows_P, cols_P)
