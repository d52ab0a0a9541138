"""Block-sparse attention: each query block of each head attends only to its scheduled key blocks.

q, k, v `[B, H, T, K]` are cut into blocks of b positions (T padded to R b, R = ceil(T / b)).
An `AttentionSchedule` lists the Z stored (head, query block r, key block c) triples in
row-major order: a `BlockSchedule` of the `[H R, R]` block mask whose row h R + r holds head h's
query block r, plus per stored block z the index tile_Z[z] of its b x b token mask in tiles_Uqk
(tile 0 is all True; partial blocks, and blocks holding padded positions, mask inside). For each
query position i of head h, over the keys j of its stored blocks that its tiles allow:

  o_i = sum_j softmax_j(s_ij) v_j,   s_ij = scale <q_i, k_j>,   lse_i = log sum_j exp(s_ij)

Backends (`implementation`, the `kernels.backend` conventions; a Pallas kernel will slot in as
"pallas" behind the same schedule, its by_row steps being each (head, query block)'s key blocks):

  reference  the schedule densified to a `[H, T, T]` token mask, masked dense softmax attention,
             differentiated by JAX.
  xla        the Z stored blocks as one batch: gather the query, key and value blocks of each,
             s_z = q_{r_z} k_{c_z}^T in `[Z, B, b, b]`, each query row's max and sum of exp by
             segment max / sum over the blocks of its query block, o = segment sum of p_z v_{c_z}
             over them, normalised. The backward (`jax.custom_vjp`) recomputes
             p_z = exp(s_z - lse) from the saved logsumexp, as flash attention does, and
             scatter-adds dq over query blocks, dk and dv over key blocks. Every cost is
             proportional to Z: rows are not padded to the longest one (under a causal mask
             that padding would double the work), and no block outside the schedule is touched.
  auto       xla on every platform (the only fast path so far).

Shape letters beyond the DESIGN legend: K the per-head dim, R query / key blocks per head,
G = H R query blocks of all heads, Z stored blocks, U distinct tiles, q / k a block's own query /
key positions. Dao et al. 2022, "FlashAttention" (backward recomputation from the logsumexp);
Child et al. 2019, "Generating Long Sequences with Sparse Transformers" (block-sparse
attention kernels).
"""
import functools

import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kernels.block_schedule import BlockSchedule, build_block_schedule

IMPLEMENTATIONS = ("auto", "xla", "reference")


@flax.struct.dataclass
class AttentionSchedule:
  """The stored (head, query block, key block) triples of a block-sparse attention and their masks.

  blocks: `BlockSchedule` of the `[H R, R]` block mask (row h R + r is head h's query block r);
    its rows_Z / cols_Z list the stored blocks in row-major order, its by_row steps each query
    block's key blocks.
  tile_Z: int32 `[Z]`, the token mask of stored block z as an index into tiles_Uqk.
  tiles_Uqk: bool `[U, b, b]`, tile 0 all True.
  seq_len: T (static); num_heads: H (static).
  """
  blocks: BlockSchedule
  tile_Z: jax.Array
  tiles_Uqk: jax.Array
  seq_len: int = flax.struct.field(pytree_node=False)
  num_heads: int = flax.struct.field(pytree_node=False)

  @property
  def block(self) -> int:
    """b, the positions per block."""
    return self.tiles_Uqk.shape[-1]

  @property
  def num_blocks(self) -> int:
    """R, the query (and key) blocks per head."""
    return -(-self.seq_len // self.block)

  @property
  def density(self) -> float:
    """Z / (H R^2), the fraction of the blocks of all heads that are stored."""
    return self.blocks.density


def build_attention_schedule(tile_HRC: np.ndarray, tiles_Uqk: np.ndarray,
                             seq_len: int) -> AttentionSchedule:
  """The schedule of a block layout, after checking host-side that every query sees a key.

  Args:
    tile_HRC: int `[H, R, R]`: -1 where head h's query block r skips key block c, else the index
      into tiles_Uqk of that block's token mask (R = ceil(seq_len / b)).
    tiles_Uqk: bool `[U, b, b]` token masks, tile 0 all True (e.g. from
      `sparsejax.attention.patterns.block_layout`).
    seq_len: T.

  Raises a ValueError naming the head and query position of the first query that sees no key
  (among positions < seq_len), or any shape that does not fit.
  """
  tile_HRC, tiles_Uqk = np.asarray(tile_HRC), np.asarray(tiles_Uqk)
  if tiles_Uqk.ndim != 3 or tiles_Uqk.dtype != np.bool_ or tiles_Uqk.shape[1] != tiles_Uqk.shape[2]:
    raise ValueError(f"tiles must be bool [U, b, b], got dtype {tiles_Uqk.dtype} and shape "
                     f"{tiles_Uqk.shape}")
  if not tiles_Uqk[0].all():
    raise ValueError("tiles[0] must be all True (the tile of full blocks)")
  block = tiles_Uqk.shape[-1]
  num_blocks = -(-seq_len // block) if seq_len >= 1 else 0
  if tile_HRC.ndim != 3 or tile_HRC.shape[1:] != (num_blocks, num_blocks) or num_blocks == 0:
    raise ValueError(f"tile must be [H, {num_blocks}, {num_blocks}] for seq_len={seq_len} and "
                     f"block {block}, got shape {tile_HRC.shape}")
  if tile_HRC.min() < -1 or tile_HRC.max() >= tiles_Uqk.shape[0]:
    raise ValueError(f"tile entries must be -1 or in [0, {tiles_Uqk.shape[0]}), got range "
                     f"[{tile_HRC.min()}, {tile_HRC.max()}]")
  num_heads = tile_HRC.shape[0]
  tile_GC = tile_HRC.reshape(num_heads * num_blocks, num_blocks)
  blocks = build_block_schedule(tile_GC >= 0)
  tile_Z = tile_GC[blocks.rows_Z, blocks.cols_Z].astype(np.int32)
  _check_every_query_sees_a_key(blocks, tile_Z, tiles_Uqk, num_heads, seq_len)
  return AttentionSchedule(blocks, tile_Z, tiles_Uqk, seq_len, num_heads)


def schedule_from_mask(mask_HTT: np.ndarray, block: int) -> AttentionSchedule:
  """The schedule of a dense token mask `[H, T, T]` (True = query t may attend to key s).

  Every b x b block with an allowed pair is stored, with its own tile unless it is all True.
  Host-side and O(H T^2): for tests and small custom masks; patterns build layouts directly.
  """
  mask_HTT = np.asarray(mask_HTT)
  if mask_HTT.ndim != 3 or mask_HTT.dtype != np.bool_ or mask_HTT.shape[1] != mask_HTT.shape[2]:
    raise ValueError(f"mask must be bool [H, T, T], got dtype {mask_HTT.dtype} and shape "
                     f"{mask_HTT.shape}")
  if block < 1:
    raise ValueError(f"block={block} must be a positive int")
  num_heads, seq_len, _ = mask_HTT.shape
  num_blocks = -(-seq_len // block)
  pad = num_blocks * block - seq_len
  padded = np.pad(mask_HTT, [(0, 0), (0, pad), (0, pad)])
  tiles_HRCqk = padded.reshape(num_heads, num_blocks, block, num_blocks, block).swapaxes(2, 3)
  stored_HRC = tiles_HRCqk.any((3, 4))
  masked_HRC = stored_HRC & ~tiles_HRCqk.all((3, 4))
  tile_HRC = np.where(stored_HRC, 0, -1)
  tile_HRC[masked_HRC] = 1 + np.arange(int(masked_HRC.sum()))
  tiles_Uqk = np.concatenate([np.ones((1, block, block), bool), tiles_HRCqk[masked_HRC]])
  return build_attention_schedule(tile_HRC, tiles_Uqk, seq_len)


def _check_every_query_sees_a_key(blocks: BlockSchedule, tile_Z: np.ndarray,
                                  tiles_Uqk: np.ndarray, num_heads: int, seq_len: int):
  """A ValueError naming the first (head, query position) that no stored block lets see a key."""
  block = tiles_Uqk.shape[-1]
  sees_Gq = np.zeros((blocks.grid_shape[0], block), bool)
  np.logical_or.at(sees_Gq, blocks.rows_Z, tiles_Uqk.any(-1)[tile_Z])
  blind_HT = ~sees_Gq.reshape(num_heads, -1)[:, :seq_len]
  if blind_HT.any():
    head, position = np.argwhere(blind_HT)[0]
    raise ValueError(f"query position {position} of head {head} sees no key "
                     f"({int(blind_HT.sum())} blind queries in all); every query must attend to "
                     f"at least one key, e.g. itself")


def densify_schedule(schedule: AttentionSchedule) -> jax.Array:
  """The token mask `[H, T, T]` the schedule encodes: its tiles at their blocks, False elsewhere."""
  num_heads, num_blocks, block = schedule.num_heads, schedule.num_blocks, schedule.block
  grid_GCqk = jnp.zeros((num_heads * num_blocks, num_blocks, block, block), bool)
  grid_GCqk = grid_GCqk.at[schedule.blocks.rows_Z, schedule.blocks.cols_Z].set(
      jnp.asarray(schedule.tiles_Uqk)[schedule.tile_Z])
  padded = num_blocks * block
  mask_HTT = grid_GCqk.reshape(num_heads, num_blocks, num_blocks, block, block).swapaxes(2, 3)
  mask_HTT = mask_HTT.reshape(num_heads, padded, padded)
  return mask_HTT[:, :schedule.seq_len, :schedule.seq_len]


def block_sparse_attention_reference(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                                     schedule: AttentionSchedule,
                                     scale: float | None = None) -> jax.Array:
  """Dense reference: softmax(scale q k^T, masked by the densified schedule) v, in float32."""
  scale = _default_scale(q_BHTK, scale)
  precision = lax.Precision.HIGHEST
  scores_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK.astype(jnp.float32),
                           k_BHTK.astype(jnp.float32), precision=precision) * scale
  scores_BHTS = jnp.where(densify_schedule(schedule), scores_BHTS, -jnp.inf)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
  o_BHTK = jnp.einsum("bhts,bhsk->bhtk", probs_BHTS, v_BHTK.astype(jnp.float32),
                      precision=precision)
  return o_BHTK.astype(v_BHTK.dtype)


def block_sparse_attention(q_BHTK: jax.Array, k_BHTK: jax.Array, v_BHTK: jax.Array,
                           schedule: AttentionSchedule, *, scale: float | None = None,
                           implementation: str = "auto") -> jax.Array:
  """Softmax attention of each query over the keys its schedule lets it see.

  Args:
    q_BHTK, k_BHTK, v_BHTK: `[B, H, T, K]`, H and T the schedule's.
    schedule: `build_attention_schedule(...)` (or `schedule_from_mask`), shared by the batch.
    scale: the score scale; default 1 / sqrt(K).
    implementation: "auto", "xla" or "reference" (see the module docstring).

  Returns:
    o `[B, H, T, K]` in v's dtype, computed in float32.
  """
  _check_args(q_BHTK, k_BHTK, v_BHTK, schedule)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of "
                     f"{', '.join(map(repr, IMPLEMENTATIONS))}")
  scale = _default_scale(q_BHTK, scale)
  schedule = jax.tree.map(jnp.asarray, schedule)
  if implementation == "reference":
    return block_sparse_attention_reference(q_BHTK, k_BHTK, v_BHTK, schedule, scale)
  return _bsa(q_BHTK, k_BHTK, v_BHTK, schedule, scale)


def _default_scale(q_BHTK: jax.Array, scale: float | None) -> float:
  return q_BHTK.shape[-1] ** -0.5 if scale is None else float(scale)


def _check_args(q_BHTK, k_BHTK, v_BHTK, schedule):
  """q, k, v are [B, H, T, K] alike with the schedule's H and T, or a ValueError naming them."""
  if not isinstance(schedule, AttentionSchedule):
    raise ValueError(f"schedule must be an AttentionSchedule, got {type(schedule).__name__}")
  expected = (schedule.num_heads, schedule.seq_len)
  for name, x in (("q", q_BHTK), ("k", k_BHTK), ("v", v_BHTK)):
    if x.ndim != 4 or x.shape[1:3] != expected or x.shape != q_BHTK.shape:
      raise ValueError(f"{name} must be [B, H={expected[0]}, T={expected[1]}, K] like q "
                       f"{q_BHTK.shape}, got shape {x.shape}")


# ------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bsa(q_BHTK, k_BHTK, v_BHTK, schedule, scale):
  return _forward(q_BHTK, k_BHTK, v_BHTK, schedule, scale)[0]


def _bsa_fwd(q_BHTK, k_BHTK, v_BHTK, schedule, scale):
  o_BHTK, lse_GBq = _forward(q_BHTK, k_BHTK, v_BHTK, schedule, scale)
  return o_BHTK, (q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse_GBq)


def _bsa_bwd(scale, residuals, do_BHTK):
  q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse_GBq = residuals
  dq_BHTK, dk_BHTK, dv_BHTK = _backward(q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse_GBq,
                                        do_BHTK, scale)
  return (dq_BHTK.astype(q_BHTK.dtype), dk_BHTK.astype(k_BHTK.dtype),
          dv_BHTK.astype(v_BHTK.dtype), None)


_bsa.defvjp(_bsa_fwd, _bsa_bwd)


# -------------------------------------------------------------------------------------- XLA


def _to_blocks(x_BHTK: jax.Array, block: int) -> jax.Array:
  """`[B, H, T, K]` -> `[H R, B, b, K]` in float32, T zero-padded to R b."""
  batch, heads, length, dim = x_BHTK.shape
  num_blocks = -(-length // block)
  x_BHTK = jnp.pad(x_BHTK.astype(jnp.float32),
                   [(0, 0), (0, 0), (0, num_blocks * block - length), (0, 0)])
  x_BHRbK = x_BHTK.reshape(batch, heads, num_blocks, block, dim)
  return x_BHRbK.transpose(1, 2, 0, 3, 4).reshape(heads * num_blocks, batch, block, dim)


def _from_blocks(x_GBbK: jax.Array, heads: int, length: int) -> jax.Array:
  """`[H R, B, b, K]` -> `[B, H, T, K]`, the padding dropped."""
  groups, batch, block, dim = x_GBbK.shape
  x_HRBbK = x_GBbK.reshape(heads, groups // heads, batch, block, dim)
  return x_HRBbK.transpose(2, 0, 1, 3, 4).reshape(batch, heads, -1, dim)[:, :, :length]


def _key_blocks(schedule: AttentionSchedule) -> jax.Array:
  """For each stored block z, the row of its key block in `_to_blocks(k)`: h R + c_z."""
  rows_Z = schedule.blocks.rows_Z
  return rows_Z - rows_Z % schedule.num_blocks + schedule.blocks.cols_Z


def _scores(q_GBqK, k_GBkK, schedule):
  """s_z = q_{r_z} k_{c_z}^T `[Z, B, q, k]`, the tiles' masked pairs at -inf (q comes scaled)."""
  rows_Z = schedule.blocks.rows_Z
  s_ZBqk = jnp.einsum("zbqd,zbkd->zbqk", q_GBqK[rows_Z], k_GBkK[_key_blocks(schedule)])
  # The schedule is usually a jit constant: the barrier keeps XLA from folding this gather into
  # a [Z, b, b] constant at compile time.
  tile_Z, tiles_Uqk = lax.optimization_barrier((schedule.tile_Z, schedule.tiles_Uqk))
  return jnp.where(tiles_Uqk[tile_Z][:, None], s_ZBqk, -jnp.inf)


def _forward(q_BHTK, k_BHTK, v_BHTK, schedule, scale):
  """(o, lse): the attention output `[B, H, T, K]` and each query row's logsumexp `[G, B, q]`."""
  block, heads, length = schedule.block, schedule.num_heads, schedule.seq_len
  rows_Z, groups = schedule.blocks.rows_Z, schedule.blocks.grid_shape[0]
  q_GBqK = _to_blocks(q_BHTK, block) * scale
  s_ZBqk = _scores(q_GBqK, _to_blocks(k_BHTK, block), schedule)
  max_GBq = jax.ops.segment_max(s_ZBqk.max(-1), rows_Z, groups, indices_are_sorted=True)
  max_GBq = jnp.where(jnp.isfinite(max_GBq), max_GBq, 0.0)  # padded queries see no key
  p_ZBqk = jnp.exp(s_ZBqk - max_GBq[rows_Z][..., None])
  sum_GBq = jax.ops.segment_sum(p_ZBqk.sum(-1), rows_Z, groups, indices_are_sorted=True)
  v_ZBkK = _to_blocks(v_BHTK, block)[_key_blocks(schedule)]
  o_ZBqK = jnp.einsum("zbqk,zbkd->zbqd", p_ZBqk, v_ZBkK)
  o_GBqK = jax.ops.segment_sum(o_ZBqK, rows_Z, groups, indices_are_sorted=True)
  seen_GBq = sum_GBq > 0
  o_GBqK = o_GBqK / jnp.where(seen_GBq, sum_GBq, 1.0)[..., None]
  lse_GBq = jnp.where(seen_GBq, max_GBq + jnp.log(jnp.where(seen_GBq, sum_GBq, 1.0)), 0.0)
  return _from_blocks(o_GBqK, heads, length).astype(v_BHTK.dtype), lse_GBq


def _backward(q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse_GBq, do_BHTK, scale):
  """(dq, dk, dv) from p_z = exp(s_z - lse), ds_z = p_z (do v^T - rowsum(do o)), flash style."""
  block, heads, length = schedule.block, schedule.num_heads, schedule.seq_len
  rows_Z, groups = schedule.blocks.rows_Z, schedule.blocks.grid_shape[0]
  key_blocks_Z = _key_blocks(schedule)
  q_GBqK = _to_blocks(q_BHTK, block) * scale
  k_GBkK = _to_blocks(k_BHTK, block)
  do_GBqK = _to_blocks(do_BHTK, block)
  delta_GBq = jnp.sum(do_GBqK * _to_blocks(o_BHTK, block), -1)
  p_ZBqk = jnp.exp(_scores(q_GBqK, k_GBkK, schedule) - lse_GBq[rows_Z][..., None])
  do_ZBqK = do_GBqK[rows_Z]
  v_ZBkK = _to_blocks(v_BHTK, block)[key_blocks_Z]
  dv_ZBkK = jnp.einsum("zbqk,zbqd->zbkd", p_ZBqk, do_ZBqK)
  dp_ZBqk = jnp.einsum("zbqd,zbkd->zbqk", do_ZBqK, v_ZBkK)
  ds_ZBqk = p_ZBqk * (dp_ZBqk - delta_GBq[rows_Z][..., None])
  dq_ZBqK = jnp.einsum("zbqk,zbkd->zbqd", ds_ZBqk, k_GBkK[key_blocks_Z]) * scale
  dk_ZBkK = jnp.einsum("zbqk,zbqd->zbkd", ds_ZBqk, q_GBqK[rows_Z])
  dq_GBqK = jax.ops.segment_sum(dq_ZBqK, rows_Z, groups, indices_are_sorted=True)
  dk_GBkK = jax.ops.segment_sum(dk_ZBkK, key_blocks_Z, groups)
  dv_GBkK = jax.ops.segment_sum(dv_ZBkK, key_blocks_Z, groups)
  return tuple(_from_blocks(g, heads, length) for g in (dq_GBqK, dk_GBkK, dv_GBkK))
