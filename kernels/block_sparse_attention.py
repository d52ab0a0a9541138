"""Block-sparse attention: each query block of each head attends only to its scheduled key blocks.

q, k, v `[B, H, T, K]` are cut into blocks of b positions (T padded to R b, R = ceil(T / b)).
An `AttentionSchedule` lists the Z stored (head, query block r, key block c) triples in
row-major order: a `BlockSchedule` of the `[H R, R]` block mask whose row h R + r holds head h's
query block r, plus per stored block z the index tile_Z[z] of its b x b token mask in tiles_Uqk
(tile 0 is all True; partial blocks, and blocks holding padded positions, mask inside). For each
query position i of head h, over the keys j of its stored blocks that its tiles allow:

  o_i = sum_j softmax_j(s_ij) v_j,   s_ij = scale <q_i, k_j>,   lse_i = log sum_j exp(s_ij)

Backends (`implementation`, the `kernels.backend` conventions):

  reference   the schedule densified to a `[H, T, T]` token mask, masked dense softmax attention,
              differentiated by JAX.
  xla         the Z stored blocks as one batch: gather the query, key and value blocks of each,
              s_z = q_{r_z} k_{c_z}^T in `[Z, B, b, b]`, each query row's max and sum of exp by
              segment max / sum over the blocks of its query block, o = segment sum of p_z v_{c_z}
              over them, normalised. The backward (`jax.custom_vjp`) recomputes
              p_z = exp(s_z - lse) from the saved logsumexp, as flash attention does, and
              scatter-adds dq over query blocks, dk and dv over key blocks. Every cost is
              proportional to Z: rows are not padded to the longest one (under a causal mask
              that padding would double the work), and no block outside the schedule is touched.
  pallas tpu  Mosaic, grid (B, S steps) over a flat step list passed as scalar prefetch (the
              key-block indices, tile indices and live flags of each step): the forward and dq
              passes walk blocks.by_row (each query block's key blocks), the dk / dv pass
              by_key (each key block's query blocks). Each output block accumulates in VMEM
              scratch over its consecutive steps (online softmax m, l, acc in the forward) and
              is written on its last one; tiles mask inside; dead steps (live = 0: an output
              with no block, the padding to capacity) compute nothing. Cost follows Z, not
              rows x longest row. Blocks must be multiples of 128.
  pallas gpu  Triton, grid (B, H R): a program per (batch, query block) (per key block for
              dk / dv) loops (`lax.fori_loop`) over its steps [start_O1[o], start_O1[o + 1]),
              the same online softmax in registers. Blocks and K powers of two >= 16.
  auto        pallas on TPU and GPU when the block (and K) fit the kernel's tiling, else xla.

The Pallas backward (both flavours, FlashAttention-2 style): delta = rowsum(do o) in XLA, then
per stored block p = exp(s - lse), dp = do v^T, ds = p (dp - delta); dq = scale sum ds k in a
pass over by_row, dk = scale sum ds^T q and dv = sum p^T do in a pass over by_key.

Shape letters beyond the DESIGN legend: K the per-head dim, R query / key blocks per head,
G = H R query blocks of all heads, Z stored blocks, U distinct tiles, q / k a block's own query /
key positions, S steps of a pass. Dao et al. 2022, "FlashAttention" (backward recomputation
from the logsumexp); Dao 2023, "FlashAttention-2" (the dq and dk / dv passes); Child et al.
2019, "Generating Long Sequences with Sparse Transformers" (block-sparse attention kernels).
"""
import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp
import numpy as np

from kernels import backend as backend_lib
from kernels.block_schedule import BlockSchedule, BlockSteps, build_block_schedule

_TPU_LANE = 128
_GPU_MIN_TILE = 16


@flax.struct.dataclass
class AttentionSchedule:
  """The stored (head, query block, key block) triples of a block-sparse attention and their masks.

  blocks: `BlockSchedule` of the `[H R, R]` block mask (row h R + r is head h's query block r);
    its rows_Z / cols_Z list the stored blocks in row-major order, its by_row steps each query
    block's key blocks.
  by_key: `BlockSteps` of each key block's query blocks: output h R + c (head h's key block c),
    input r (the query block), block_S the stored block z. Unlike blocks.by_col (grouped by c
    over all heads), every (head, key block) gets at least one step, for the dk / dv pass.
  tile_Z: int32 `[Z]`, the token mask of stored block z as an index into tiles_Uqk.
  tiles_Uqk: bool `[U, b, b]`, tile 0 all True.
  seq_len: T (static); num_heads: H (static).
  """
  blocks: BlockSchedule
  by_key: BlockSteps
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
  (among positions < seq_len), the first block whose tile lets a query see a padded key
  (>= seq_len), or any shape that does not fit.
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
  _check_no_query_sees_a_padded_key(blocks, tile_Z, tiles_Uqk, num_blocks, seq_len)
  _check_every_query_sees_a_key(blocks, tile_Z, tiles_Uqk, num_heads, seq_len)
  return AttentionSchedule(blocks, _key_steps(blocks, num_blocks), tile_Z, tiles_Uqk, seq_len,
                           num_heads)


def _key_steps(blocks: BlockSchedule, num_blocks: int) -> BlockSteps:
  """The by_row steps of the per-head transposed block mask, block_S mapped back to z.

  Stored block z = (h R + r, c) becomes (h R + c, r): its row is head h's key block c.
  """
  heads_Z = blocks.rows_Z // num_blocks
  key_rows_Z = heads_Z * num_blocks + blocks.cols_Z
  query_blocks_Z = blocks.rows_Z % num_blocks
  mask_GR = np.zeros(blocks.grid_shape, bool)
  mask_GR[key_rows_Z, query_blocks_Z] = True
  z_GR = np.zeros(blocks.grid_shape, np.int32)
  z_GR[key_rows_Z, query_blocks_Z] = np.arange(blocks.num_blocks)
  transposed = build_block_schedule(mask_GR)
  steps = transposed.by_row
  return steps.replace(block_S=z_GR[transposed.rows_Z, transposed.cols_Z][steps.block_S])


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


def _check_no_query_sees_a_padded_key(blocks: BlockSchedule, tile_Z: np.ndarray,
                                      tiles_Uqk: np.ndarray, num_blocks: int, seq_len: int):
  """A ValueError naming the first stored block whose tile lets a query < T see a key >= T (the
  kernels read padded keys as zeros and would count them in the softmax)."""
  block = tiles_Uqk.shape[-1]
  pad = num_blocks * block - seq_len
  last_N = np.flatnonzero(blocks.cols_Z == num_blocks - 1)
  if not pad or not last_N.size:
    return
  real_queries_N = np.where(blocks.rows_Z[last_N] % num_blocks == num_blocks - 1, block - pad,
                            block)
  real_Nq = np.arange(block) < real_queries_N[:, None]
  leaks_N = (tiles_Uqk[tile_Z[last_N]][:, :, block - pad:].any(-1) & real_Nq).any(-1)
  if leaks_N.any():
    row = int(blocks.rows_Z[last_N[np.argmax(leaks_N)]])
    raise ValueError(f"the tile of head {row // num_blocks}, query block {row % num_blocks}, key "
                     f"block {num_blocks - 1} lets queries see padded keys >= seq_len={seq_len}; "
                     f"a ragged last key block needs a tile that masks them")


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
                           implementation: str = "auto", interpret: bool = False,
                           platform: str | None = None) -> jax.Array:
  """Softmax attention of each query over the keys its schedule lets it see.

  Args:
    q_BHTK, k_BHTK, v_BHTK: `[B, H, T, K]`, H and T the schedule's.
    schedule: `build_attention_schedule(...)` (or `schedule_from_mask`), shared by the batch.
    scale: the score scale; default 1 / sqrt(K).
    implementation: "auto", "pallas", "xla" or "reference" (see the module docstring and
      `kernels.backend`).
    interpret: run the Pallas kernels in the Pallas interpreter (CPU tests).
    platform: the platform to plan for (default: JAX's default backend), e.g. "tpu" to lower
      the TPU kernels from a CPU host with `jax.export`, or "gpu" for the Triton flavour.

  Returns:
    o `[B, H, T, K]` in v's dtype, computed in float32.
  """
  _check_args(q_BHTK, k_BHTK, v_BHTK, schedule)
  backend = backend_lib.resolve_backend(implementation, interpret, platform)
  if backend.kind == "pallas" and not backend.interpret:
    problem = _pallas_shape_problem(schedule.block, q_BHTK.shape[-1], backend.platform)
    if problem and implementation == "pallas":
      raise ValueError(problem)
    backend = backend_lib.Backend("xla") if problem else backend
  scale = _default_scale(q_BHTK, scale)
  schedule = jax.tree.map(jnp.asarray, schedule)
  if backend.kind == "reference":
    return block_sparse_attention_reference(q_BHTK, k_BHTK, v_BHTK, schedule, scale)
  return _bsa(q_BHTK, k_BHTK, v_BHTK, schedule, _Config(scale, backend))


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


def _pallas_shape_problem(block: int, head_dim: int, platform: str) -> str | None:
  """Why the compiled kernel of `platform` cannot tile this block and head dim, or None."""
  if platform == "tpu" and block % _TPU_LANE:
    return f"the TPU kernel needs a block that is a multiple of {_TPU_LANE}, got {block}"
  if platform == "gpu" and any(d < _GPU_MIN_TILE or d & (d - 1) for d in (block, head_dim)):
    return (f"the GPU kernel needs a block and head dim that are powers of two >= "
            f"{_GPU_MIN_TILE}, got block {block} and head dim {head_dim}")
  return None


class _Config(NamedTuple):
  scale: float
  backend: backend_lib.Backend


# ------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bsa(q_BHTK, k_BHTK, v_BHTK, schedule, config):
  return _forward(q_BHTK, k_BHTK, v_BHTK, schedule, config)[0]


def _bsa_fwd(q_BHTK, k_BHTK, v_BHTK, schedule, config):
  o_BHTK, lse = _forward(q_BHTK, k_BHTK, v_BHTK, schedule, config)
  return o_BHTK, (q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse)


def _bsa_bwd(config, residuals, do_BHTK):
  q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse = residuals
  backward = _backward_xla if config.backend.kind == "xla" else _backward_pallas
  dq_BHTK, dk_BHTK, dv_BHTK = backward(q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse, do_BHTK,
                                       config)
  return (dq_BHTK.astype(q_BHTK.dtype), dk_BHTK.astype(k_BHTK.dtype),
          dv_BHTK.astype(v_BHTK.dtype), None)


_bsa.defvjp(_bsa_fwd, _bsa_bwd)


def _forward(q_BHTK, k_BHTK, v_BHTK, schedule, config):
  """(o, lse) on the configured backend; lse in that backend's layout, for its backward."""
  forward = _forward_xla if config.backend.kind == "xla" else _forward_pallas
  return forward(q_BHTK, k_BHTK, v_BHTK, schedule, config)


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


def _forward_xla(q_BHTK, k_BHTK, v_BHTK, schedule, config):
  """(o, lse): the attention output `[B, H, T, K]` and each query row's logsumexp `[G, B, q]`."""
  scale = config.scale
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


def _backward_xla(q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse_GBq, do_BHTK, config):
  """(dq, dk, dv) from p_z = exp(s_z - lse), ds_z = p_z (do v^T - rowsum(do o)), flash style."""
  scale = config.scale
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


# ------------------------------------------------------------------------------------ Pallas


class _Pass(NamedTuple):
  """One kernel pass: per output block, float32 accumulators folded over its stored blocks.

  carry: (shape, initial value) of each accumulator.
  update(carry, row_values, col_values, valid_qk) -> carry: one stored block, where the row
    values come from the output's block row, the column values from the step's other block row,
    and valid_qk is the block's token mask (query x key).
  finish(carry) -> the outputs of the block.
  """
  carry: tuple[tuple[tuple[int, ...], float], ...]
  update: Callable[..., tuple[jax.Array, ...]]
  finish: Callable[..., tuple[jax.Array, ...]]


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a b^T in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.dot(a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _masked_scores(q_qK, k_kK, valid_qk, scale):
  return jnp.where(valid_qk, _dot_nt(q_qK, k_kK) * scale, -jnp.inf)


def _forward_pass(block: int, head_dim: int, scale: float) -> _Pass:
  """Online softmax over a query block's key blocks -> (o, lse) (Milakov & Gimelshein 2018)."""

  def update(carry, row_values, col_values, valid_qk):
    m_q1, l_q1, acc_qK = carry
    (q_qK,), (k_kK, v_kK) = row_values, col_values
    s_qk = _masked_scores(q_qK, k_kK, valid_qk, scale)
    m_new_q1 = jnp.maximum(m_q1, s_qk.max(-1, keepdims=True))
    m_safe_q1 = jnp.where(m_new_q1 == -jnp.inf, 0.0, m_new_q1)  # no key seen yet: no NaN
    alpha_q1 = jnp.exp(m_q1 - m_safe_q1)
    p_qk = jnp.exp(s_qk - m_safe_q1)
    return (m_new_q1, alpha_q1 * l_q1 + p_qk.sum(-1, keepdims=True),
            alpha_q1 * acc_qK + _dot(p_qk, v_kK))

  def finish(carry):
    m_q1, l_q1, acc_qK = carry
    seen_q1 = l_q1 > 0  # padded queries see no key: o = 0, lse = 0
    l_q1 = jnp.where(seen_q1, l_q1, 1.0)
    return acc_qK / l_q1, jnp.where(seen_q1, m_q1 + jnp.log(l_q1), 0.0)

  carry = (((block, 1), -jnp.inf), ((block, 1), 0.0), ((block, head_dim), 0.0))
  return _Pass(carry, update, finish)


def _dq_pass(block: int, head_dim: int, scale: float) -> _Pass:
  """dq = scale sum over a query block's key blocks of ds k, ds = p (do v^T - delta)."""

  def update(carry, row_values, col_values, valid_qk):
    (q_qK, do_qK, lse_q1, delta_q1), (k_kK, v_kK) = row_values, col_values
    p_qk = jnp.exp(_masked_scores(q_qK, k_kK, valid_qk, scale) - lse_q1)
    ds_qk = p_qk * (_dot_nt(do_qK, v_kK) - delta_q1)
    return (carry[0] + _dot(ds_qk, k_kK) * scale,)

  return _Pass((((block, head_dim), 0.0),), update, lambda carry: carry)


def _dkdv_pass(block: int, head_dim: int, scale: float) -> _Pass:
  """dk = scale sum ds^T q and dv = sum p^T do over a key block's query blocks."""

  def update(carry, row_values, col_values, valid_qk):
    dk_kK, dv_kK = carry
    (k_kK, v_kK), (q_qK, do_qK, lse_q1, delta_q1) = row_values, col_values
    p_qk = jnp.exp(_masked_scores(q_qK, k_kK, valid_qk, scale) - lse_q1)
    ds_qk = p_qk * (_dot_nt(do_qK, v_kK) - delta_q1)
    return dk_kK + _dot(ds_qk.T, q_qK) * scale, dv_kK + _dot(p_qk.T, do_qK)

  zeros = ((block, head_dim), 0.0)
  return _Pass((zeros, zeros), update, lambda carry: carry)


def _pad_blocks(x_BHTK: jax.Array, block: int) -> jax.Array:
  """`[B, H, T, K]` -> `[B, H R, b, K]`, T zero-padded to R b."""
  batch, heads, length, dim = x_BHTK.shape
  num_blocks = -(-length // block)
  x_BHTK = jnp.pad(x_BHTK, [(0, 0), (0, 0), (0, num_blocks * block - length), (0, 0)])
  return x_BHTK.reshape(batch, heads * num_blocks, block, dim)


def _unpad_blocks(x_BGbK: jax.Array, heads: int, length: int) -> jax.Array:
  """`[B, H R, b, K]` -> `[B, H, T, K]`, the padding dropped."""
  batch, _, _, dim = x_BGbK.shape
  return x_BGbK.reshape(batch, heads, -1, dim)[:, :, :length]


def _run_pass(pass_: _Pass, rows: tuple, cols: tuple, steps: BlockSteps,
              schedule: AttentionSchedule, out_shapes: tuple, backend) -> tuple[jax.Array, ...]:
  """The pass over `steps` in the backend's flavour; outputs `[B, G, b, ...]`, one per block row.

  rows / cols: `[B, G, b, ...]` arrays read at the output's block row out_S / at the step's
  other block row h R + in_S of the same head.
  """
  out_S = steps.out_S
  other_S = out_S - out_S % schedule.num_blocks + steps.in_S
  tile_S = schedule.tile_Z[steps.block_S]
  tiles_Uqk = schedule.tiles_Uqk.astype(jnp.int32)  # Mosaic and Triton load no bool arrays
  if backend.platform == "tpu":
    prefetch = (out_S, other_S, tile_S, steps.live_S)
    return _run_tpu(pass_, rows, cols, tiles_Uqk, prefetch, out_shapes, backend.interpret)
  prefetch = (steps.start_O1, other_S, tile_S, steps.live_S)
  return _run_gpu(pass_, rows, cols, tiles_Uqk, prefetch, out_shapes, backend.interpret)


def _run_tpu(pass_, rows, cols, tiles_Uqk, prefetch, out_shapes, interpret):
  """Mosaic kernel, grid (B, S): the accumulators live in VMEM scratch across an output's steps."""
  num_steps = prefetch[0].shape[0]
  num_rows, num_cols, num_out = len(rows), len(cols), len(out_shapes)

  def kernel(out_ref, other_ref, tile_ref, live_ref, *refs):
    del other_ref, tile_ref  # used by the index maps
    row_refs, col_refs = refs[:num_rows], refs[num_rows:num_rows + num_cols]
    tiles_ref = refs[num_rows + num_cols]
    out_refs = refs[num_rows + num_cols + 1:num_rows + num_cols + 1 + num_out]
    carry_refs = refs[num_rows + num_cols + 1 + num_out:]
    s = pl.program_id(1)
    out = out_ref[s]
    first = (s == 0) | (out != out_ref[jnp.maximum(s - 1, 0)])
    last = (s == num_steps - 1) | (out != out_ref[jnp.minimum(s + 1, num_steps - 1)])

    @pl.when(first)
    def _():
      for ref, (_, value) in zip(carry_refs, pass_.carry):
        ref[...] = jnp.full(ref.shape, value, jnp.float32)

    @pl.when(live_ref[s] == 1)
    def _():
      carry = pass_.update(tuple(ref[...] for ref in carry_refs),
                           tuple(ref[...] for ref in row_refs),
                           tuple(ref[...] for ref in col_refs), tiles_ref[...] != 0)
      for ref, value in zip(carry_refs, carry):
        ref[...] = value

    @pl.when(last)
    def _():
      for ref, value in zip(out_refs, pass_.finish(tuple(ref[...] for ref in carry_refs))):
        ref[...] = value.astype(ref.dtype)

  def spec(shape, which):
    def index_map(b, s, out_S, other_S, tile_S, live_S):
      del tile_S, live_S
      return (b, (out_S, other_S)[which][s]) + (0,) * (len(shape) - 2)

    return pl.BlockSpec((None, None) + tuple(shape[2:]), index_map)

  block = tiles_Uqk.shape[-1]
  tiles_spec = pl.BlockSpec((None, block, block), lambda b, s, out_S, other_S, tile_S, live_S:
                            (tile_S[s], 0, 0))
  return pl.pallas_call(
      kernel,
      out_shape=out_shapes,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(rows[0].shape[0], num_steps),
          in_specs=([spec(x.shape, 0) for x in rows] + [spec(x.shape, 1) for x in cols]
                    + [tiles_spec]),
          out_specs=[spec(x.shape, 0) for x in out_shapes],
          scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape, _ in pass_.carry],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(*prefetch, *rows, *cols, tiles_Uqk)


def _run_gpu(pass_, rows, cols, tiles_Uqk, prefetch, out_shapes, interpret):
  """Triton kernel, grid (B, G): a program loops over its output's steps, carrying registers."""
  num_rows, num_cols = len(rows), len(cols)

  def kernel(start_ref, other_ref, tile_ref, live_ref, *refs):
    row_refs, col_refs = refs[:num_rows], refs[num_rows:num_rows + num_cols]
    tiles_ref, out_refs = refs[num_rows + num_cols], refs[num_rows + num_cols + 1:]
    b, out = pl.program_id(0), pl.program_id(1)
    row_values = tuple(ref[...] for ref in row_refs)

    def step(s, carry):
      col_values = tuple(ref[b, other_ref[s]] for ref in col_refs)
      valid_qk = (tiles_ref[tile_ref[s]] != 0) & (live_ref[s] == 1)
      return pass_.update(carry, row_values, col_values, valid_qk)

    init = tuple(jnp.full(shape, value, jnp.float32) for shape, value in pass_.carry)
    carry = lax.fori_loop(start_ref[out], start_ref[out + 1], step, init)
    for ref, value in zip(out_refs, pass_.finish(carry)):
      ref[...] = value.astype(ref.dtype)

  def spec(shape):
    return pl.BlockSpec((None, None) + tuple(shape[2:]),
                        lambda b, out: (b, out) + (0,) * (len(shape) - 2))

  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      out_shape=out_shapes,
      grid=rows[0].shape[:2],
      in_specs=[whole] * 4 + [spec(x.shape) for x in rows] + [whole] * (num_cols + 1),
      out_specs=[spec(x.shape) for x in out_shapes],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(*prefetch, *rows, *cols, tiles_Uqk)


def _forward_pallas(q_BHTK, k_BHTK, v_BHTK, schedule, config):
  """(o `[B, H, T, K]`, lse `[B, G, b, 1]`) by the forward pass over blocks.by_row."""
  block, dim = schedule.block, q_BHTK.shape[-1]
  q_BGbK, k_BGbK, v_BGbK = (_pad_blocks(x, block) for x in (q_BHTK, k_BHTK, v_BHTK))
  out_shapes = (jax.ShapeDtypeStruct(q_BGbK.shape, v_BHTK.dtype),
                jax.ShapeDtypeStruct(q_BGbK.shape[:3] + (1,), jnp.float32))
  o_BGbK, lse_BGb1 = _run_pass(_forward_pass(block, dim, config.scale), (q_BGbK,),
                               (k_BGbK, v_BGbK), schedule.blocks.by_row, schedule, out_shapes,
                               config.backend)
  return _unpad_blocks(o_BGbK, schedule.num_heads, schedule.seq_len), lse_BGb1


def _backward_pallas(q_BHTK, k_BHTK, v_BHTK, schedule, o_BHTK, lse_BGb1, do_BHTK, config):
  """(dq, dk, dv): the dq pass over blocks.by_row, the dk / dv pass over by_key."""
  block, dim = schedule.block, q_BHTK.shape[-1]
  q_BGbK, k_BGbK, v_BGbK, do_BGbK = (_pad_blocks(x, block)
                                     for x in (q_BHTK, k_BHTK, v_BHTK, do_BHTK))
  delta_BHT1 = jnp.sum(do_BHTK.astype(jnp.float32) * o_BHTK.astype(jnp.float32), -1,
                       keepdims=True)
  delta_BGb1 = _pad_blocks(delta_BHT1, block)
  query_side = (q_BGbK, do_BGbK, lse_BGb1, delta_BGb1)
  (dq_BGbK,) = _run_pass(_dq_pass(block, dim, config.scale), query_side, (k_BGbK, v_BGbK),
                         schedule.blocks.by_row, schedule,
                         (jax.ShapeDtypeStruct(q_BGbK.shape, jnp.float32),), config.backend)
  dk_BGbK, dv_BGbK = _run_pass(_dkdv_pass(block, dim, config.scale), (k_BGbK, v_BGbK),
                               query_side, schedule.by_key, schedule,
                               (jax.ShapeDtypeStruct(k_BGbK.shape, jnp.float32),) * 2,
                               config.backend)
  return tuple(_unpad_blocks(g, schedule.num_heads, schedule.seq_len)
               for g in (dq_BGbK, dk_BGbK, dv_BGbK))
