"""Expert parallelism: experts sharded over the mesh's "expert" axis, tokens moved by all_to_all.

Layout. Tokens are sharded over the token axes `TOKEN_AXES` = ("data", "fsdp", "expert") (the
"batch" rule of `sparsejax.sharding`), replicated over "model"; the E experts are split into
n_ep = |expert| shards of E_l = E / n_ep consecutive experts, shard s holding experts
[s E_l, (s + 1) E_l), replicated over the other axes. Devices that differ only in their "expert"
coordinate form an expert group: together they hold every expert once, and exchange tokens.

The MoE layers' expert function (`core.ffn_experts`, of "moe", "conv_moe" and "hash_moe") runs
its experts here whenever the mesh splits the tokens (`select_mesh` with
`expert_parallel="auto"`), also with an expert axis of 1 (plain data parallelism: nothing is
exchanged, each device runs all experts on its own tokens).

Global plan, local exchange. The router runs outside the `shard_map`, under GSPMD, on the
logits of *all* T tokens of the call: the plan (experts, gates, capacity drops) is the one the
single-device layer computes, whatever the mesh. Per-token selection (top-k, threshold, ...)
is local to each device's rows; what looks across tokens (expert choice's per-expert top-C,
balanced assignment, capacity ranks by position or score, load counts) is partitioned by XLA,
which gathers the small [T, E] logits or [T, K] choices it needs. Every router therefore works
unchanged, at the cost of those gathers (and, for balanced assignment, of solving the
assignment for all T tokens). Each device then runs, inside `jax.shard_map`, on its own T_l
tokens and their rows of the plan (`expert_parallel_experts`):

  1. pack: each kept pair (t, k) goes to shard s = e_tk // E_l; the pairs bound for s take slots
     0, 1, ... of a `[B, D]` send buffer in choice-major, then local-token order (all first
     choices, then all second choices, as GShard ranks capacity slots). Send buffer `[n_ep, B, D]`
     plus the local expert id e_tk mod E_l of each row (E_l marks an empty row);
  2. `all_to_all` over "expert": row block s goes to shard s, which receives `[n_ep, B, D]`;
  3. the receiver sorts its n_ep B rows by local expert and runs the E_l experts as one dropless
     grouped matmul (`kernels.gmm`, the single-device layer's kernel); empty rows are in no group;
  4. the reverse `all_to_all` returns each row to its sender, which combines
     y_t = sum_k g_tk y_tk (float32), as `dispatch.combine` does.
The expert weights enter the `shard_map` as P("expert", None, "model"): a weight that is also
FSDP-sharded along "embed" is all-gathered at the boundary (and its gradient reduce-scattered);
F stays sharded over "model" (when "model" divides F; else it is gathered too) and the expert
outputs are summed over "model" (`psum`).

Buffer sizing (B per destination shard and chunk of T_c tokens):
  * worst case (`buffer_factor=None`, the default): B = T_c * min(K, E_l), further capped at
    E_l * C for a plan with capacity C. No pair the plan keeps is ever dropped, so the layer
    equals the single-device layer exactly; the buffers are min(K, E_l) n_ep / K times larger
    than the pairs they carry.
  * factor f: B = min(worst case, ceil(f * T_c * k / n_ep)), k the average pairs per token
    (the router's k); f = 1 fits a perfectly balanced load. Pairs past slot B of a destination
    are dropped deterministically: later in the choice-major, local-position order above, i.e.
    second choices before first ones, later tokens of the device's shard before earlier ones.
    A dropped pair contributes 0 (the token keeps its residual), as with capacity dropping; the
    layer counts it in "dropped_fraction". Drops depend on how tokens are split over devices
    and chunks, unlike the plan's own capacity drops, which are global.

Chunked overlap (`num_chunks` = n_c > 1, FSMoE-style): each device's tokens are split into n_c
consecutive chunks, each packed, exchanged, computed and returned on its own, unrolled in the
program, so XLA's scheduler can run chunk i + 1's all_to_all while chunk i's experts compute
(async collectives on TPU and GPU; CPU runs them in sequence). With the worst-case buffer the
result is the n_c = 1 result: every pair meets the same expert weights, only the grouping of
rows into matmuls differs (tested equal to 1e-6).

Exchange: "all_to_all" moves the whole padded `[n_ep, B, D]` buffer and runs everywhere;
"ragged" (`jax.lax.ragged_all_to_all`) sends only the filled rows of each block into the same
layout. XLA implements ragged all-to-all on TPU and GPU only; on CPU "ragged" is a ValueError.

Lepikhin et al., 2020 (GShard); Fedus et al., 2021 (Switch); Gale et al., 2023 (MegaBlocks);
Pan et al., 2025, "FSMoE: A Flexible and Scalable Training System for Sparse MoE Models".
"""
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp

from sparsejax.moe import experts as experts_lib
from sparsejax.moe import plan as plan_lib

EXPERT_AXIS = "expert"
MODEL_AXIS = "model"
TOKEN_AXES = ("data", "fsdp", "expert")
EXCHANGES = ("all_to_all", "ragged")
RAGGED_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh set by `jax.set_mesh`, or None when none is set."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def expert_axis_size(mesh: Any) -> int:
  """n_ep, the size of the mesh's "expert" axis (1 without a mesh or without that axis)."""
  if mesh is None:
    return 1
  return dict(mesh.shape).get(EXPERT_AXIS, 1)


def check_num_experts(num_experts: int, mesh: Any) -> None:
  """ValueError unless the mesh's expert axis divides num_experts."""
  n_ep = expert_axis_size(mesh)
  if num_experts % n_ep:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's expert axis "
                     f"(mesh.expert={n_ep}); each expert shard must hold the same number of "
                     f"experts: use a divisor of {num_experts}")


def select_mesh(expert_parallel: bool | str, num_experts: int) -> Any:
  """The mesh to run the experts on with `expert_parallel_experts`, or None for array code.

  True: the mesh set by `jax.set_mesh` (a ValueError without one); False: None; "auto": that
  mesh when it splits the tokens (`token_shards` > 1), else None (one device, or a
  "model"-only mesh, which GSPMD partitions well). In every mode the mesh's expert axis must
  divide num_experts.
  """
  mesh = current_mesh()
  check_num_experts(num_experts, mesh)
  if expert_parallel is False:
    return None
  if expert_parallel is True:
    if mesh is None:
      raise ValueError("expert_parallel=True needs a device mesh: call the layer inside "
                       "`with jax.set_mesh(mesh):` (see sparsejax.sharding.make_mesh)")
    return mesh
  return mesh if token_shards(mesh) > 1 else None


def check_exchange(exchange: str, platform: str) -> None:
  """ValueError unless `exchange` is known and runs on `platform`."""
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
  if exchange == "ragged" and platform not in RAGGED_PLATFORMS:
    raise ValueError(f"exchange='ragged' (jax.lax.ragged_all_to_all) runs on TPU and GPU only; "
                     f"XLA does not implement it on platform {platform!r}: use "
                     f"exchange='all_to_all'")


def mesh_platform(mesh: Any) -> str:
  """The platform of the mesh's devices ("cpu", "gpu", "tpu"), else JAX's default backend."""
  device = getattr(mesh, "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def token_axes(mesh: Any) -> tuple[str, ...]:
  """The mesh axes tokens are sharded over: those of `TOKEN_AXES` the mesh has."""
  names = mesh.axis_names
  return tuple(axis for axis in TOKEN_AXES if axis in names)


def token_shards(mesh: Any) -> int:
  """How many ways the mesh splits the tokens: the product of its token axes (1 without mesh)."""
  if mesh is None:
    return 1
  sizes = dict(mesh.shape)
  return math.prod(sizes[axis] for axis in token_axes(mesh))


def exchange_buffer_size(num_tokens: int, k: int, pairs_per_token: float, num_experts: int,
                         num_shards: int, *, capacity: int | None = None,
                         buffer_factor: float | None = None) -> int:
  """B: rows per destination shard of one device's send buffer for `num_tokens` tokens.

  Args:
    num_tokens: T_c, tokens of one chunk on one device.
    k: K, the plan's choices per token (E for expert choice).
    pairs_per_token: k, the average kept pairs per token the router aims at.
    num_experts: E. num_shards: n_ep.
    capacity: the plan's capacity C, if any.
    buffer_factor: None for the worst case, else f > 0.
  Returns:
    worst = T_c min(K, E_l), capped at E_l C; with f, min(worst, ceil(f T_c k / n_ep)); >= 1.
  """
  experts_per_shard = num_experts // num_shards
  worst = num_tokens * min(k, experts_per_shard)
  if capacity is not None:
    worst = min(worst, experts_per_shard * capacity)
  if buffer_factor is None:
    return max(worst, 1)
  if not buffer_factor > 0:
    raise ValueError(f"buffer_factor must be None or > 0, got {buffer_factor}")
  return max(1, min(worst, math.ceil(buffer_factor * num_tokens * pairs_per_token / num_shards)))


def all_to_all_bytes(buffer: int, d_model: int, num_shards: int, itemsize: int) -> int:
  """Bytes one device sends to other devices in one `[n_ep, B, D]` all_to_all.

  It keeps its own block: (n_ep - 1) B D itemsize. The layer's forward runs two such exchanges
  (there and back) and its backward two more, per chunk.
  """
  return (num_shards - 1) * buffer * d_model * itemsize


def pack(expert_TK: jax.Array, keep_TK: jax.Array, num_shards: int, experts_per_shard: int,
         buffer: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Send-buffer layout of one device's pairs: which row each pair takes and what each row holds.

  Destination s = e // E_l; a pair's slot is its rank among the kept pairs bound for s, in
  choice-major then token order (`plan.rank_within_expert`); pairs with slot >= `buffer` are not
  sent.

  Returns:
    row_TK: the pair's row s B + slot of the `[n_ep B]` buffer, n_ep B where not sent;
    pair_R: the flat pair t K + k held by each row, T K for empty rows;
    local_R: the local expert e mod E_l of each row, E_l for empty rows;
    sent_TK: whether the pair is sent.
  """
  num_tokens, k = expert_TK.shape
  num_rows = num_shards * buffer
  dest_TK = expert_TK // experts_per_shard
  order_T = jnp.arange(num_tokens, dtype=jnp.int32)
  slot_TK = plan_lib.rank_within_expert(dest_TK, keep_TK, num_shards, order_T)
  sent_TK = keep_TK & (slot_TK < buffer)
  row_TK = jnp.where(sent_TK, dest_TK * buffer + slot_TK, num_rows).astype(jnp.int32)
  pair_R = jnp.full((num_rows,), num_tokens * k, jnp.int32).at[row_TK.reshape(-1)].set(
      jnp.arange(num_tokens * k, dtype=jnp.int32), mode="drop", unique_indices=True)
  local_R = jnp.take((expert_TK % experts_per_shard).reshape(-1).astype(jnp.int32), pair_R,
                     mode="fill", fill_value=experts_per_shard)
  return row_TK, pair_R, local_R, sent_TK


def run_local_experts(x_RD: jax.Array, local_R: jax.Array, weights: dict[str, jax.Array],
                      kind: str, *, implementation: str = "auto", tile: int = 128) -> jax.Array:
  """The local experts on received rows: row r runs expert local_R[r]; rows with E_l get 0.

  Rows are sorted by expert (stable), run as one dropless grouped matmul, and unsorted.
  """
  num_local = weights["wi_EDF"].shape[0]
  perm_R = jnp.argsort(local_R, stable=True)
  sizes_E = jnp.bincount(local_R, length=num_local + 1)[:num_local].astype(jnp.int32)
  y_sorted_RD = experts_lib.experts_grouped(x_RD[perm_R], weights, sizes_E, kind,
                                            implementation=implementation, tile=tile)
  return jnp.zeros_like(y_sorted_RD).at[perm_R].set(y_sorted_RD, unique_indices=True)


def _all_to_all(x: jax.Array, num_shards: int) -> jax.Array:
  """Block s of the leading axis of `x` (`[n_ep * B, ...]`) goes to expert shard s."""
  if num_shards == 1:
    return x
  blocks = x.reshape(num_shards, -1, *x.shape[1:])
  return jax.lax.all_to_all(blocks, EXPERT_AXIS, 0, 0).reshape(x.shape)


def _ragged_all_to_all(x: jax.Array, fill, send_sizes: jax.Array, recv_sizes: jax.Array,
                       buffer: int) -> jax.Array:
  """As `_all_to_all`, sending only the first send_sizes[s] rows of each block s.

  Block s of the sender lands in block `my index` of receiver s; unsent rows keep `fill`.
  """
  num_shards = send_sizes.shape[0]
  starts = jnp.arange(num_shards, dtype=jnp.int32) * buffer
  mine = jnp.full((num_shards,), jax.lax.axis_index(EXPERT_AXIS) * buffer, jnp.int32)
  output = jnp.full_like(x, fill)
  return jax.lax.ragged_all_to_all(x, output, starts, send_sizes, mine, recv_sizes,
                                   axis_name=EXPERT_AXIS)


def _exchange_chunk(x_TD, expert_TK, gate_TK, keep_TK, weights, *, num_shards, buffer, kind,
                    exchange, model_sharded, implementation, tile):
  """One chunk on one device: pack, exchange, local experts, exchange back, combine."""
  num_local = weights["wi_EDF"].shape[0]
  row_TK, pair_R, local_R, sent_TK = pack(expert_TK, keep_TK, num_shards, num_local, buffer)
  x_RD = jnp.take(x_TD, pair_R // expert_TK.shape[1], axis=0, mode="fill", fill_value=0)
  if exchange == "ragged":
    dest_TK = expert_TK // num_local
    send_sizes = jnp.bincount(jnp.where(sent_TK, dest_TK, num_shards).reshape(-1),
                              length=num_shards + 1)[:num_shards].astype(jnp.int32)
    recv_sizes = jax.lax.all_to_all(send_sizes, EXPERT_AXIS, 0, 0, tiled=True)
    there = lambda v, fill: _ragged_all_to_all(v, fill, send_sizes, recv_sizes, buffer)
    back = lambda v: _ragged_all_to_all(v, 0, recv_sizes, send_sizes, buffer)
  else:
    there = lambda v, fill: _all_to_all(v, num_shards)
    back = lambda v: _all_to_all(v, num_shards)
  recv_x_RD = there(x_RD, 0)
  recv_local_R = there(local_R, num_local)
  y_RD = run_local_experts(recv_x_RD, recv_local_R, weights, kind,
                           implementation=implementation, tile=tile)
  if model_sharded:
    y_RD = jax.lax.psum(y_RD, MODEL_AXIS)
  y_RD = back(y_RD)
  y_TKD = jnp.take(y_RD, row_TK, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
  gate_TK = jnp.where(sent_TK, gate_TK, 0.0).astype(jnp.float32)
  y_TD = jnp.einsum("tkd,tk->td", y_TKD, gate_TK).astype(x_TD.dtype)
  dropped = jnp.sum(keep_TK & ~sent_TK).astype(jnp.int32)
  return y_TD, dropped


def expert_parallel_experts(x_TD: jax.Array, plan: plan_lib.DispatchPlan,
                            weights: dict[str, jax.Array], kind: str, *,
                            pairs_per_token: float, buffer_factor: float | None = None,
                            num_chunks: int = 1, exchange: str = "all_to_all",
                            implementation: str = "auto", tile: int = 128,
                            mesh: Any = None) -> tuple[jax.Array, jax.Array]:
  """The routed experts' combined output y_t = sum_k g_tk FFN_{e_tk}(x_t), expert-parallel.

  Same value as `dispatch.combine(experts(dispatch(x, plan)), plan)` on one device when nothing
  is dropped by the exchange buffer (see the module docstring for layout, buffer sizing,
  chunking and exchange).

  Args:
    x_TD: all T tokens (a global array; sharded over `TOKEN_AXES` inside).
    plan: the global plan for those tokens (any router, with or without capacity).
    weights: the stacked expert weights {"wi_EDF", "wo_EFD"(, "wg_EDF")} of all E experts.
    kind: "ffn" or "swiglu".
    pairs_per_token: the average kept pairs per token (sizes the factor-f buffer).
    buffer_factor: None (worst case, never drops) or f > 0.
    num_chunks: token chunks per device, each exchanged separately (overlap).
    exchange: "all_to_all" or "ragged" (TPU / GPU only).
    implementation, tile: the grouped matmul's backend and row tile (`kernels.gmm`).
    mesh: the mesh (default: the one set by `jax.set_mesh`).
  Returns:
    (y_TD in x's dtype, the number of kept pairs the exchange buffers dropped, int32 scalar).
  """
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None:
    raise ValueError("expert parallelism needs a device mesh: call inside "
                     "`with jax.set_mesh(mesh):` (see sparsejax.sharding.make_mesh)")
  if EXPERT_AXIS not in mesh.axis_names:
    raise ValueError(f"expert parallelism needs a mesh axis named {EXPERT_AXIS!r}, got axes "
                     f"{mesh.axis_names}")
  num_experts = plan.num_experts
  check_num_experts(num_experts, mesh)
  check_exchange(exchange, mesh_platform(mesh))
  if not isinstance(num_chunks, int) or num_chunks < 1:
    raise ValueError(f"num_chunks must be an int >= 1, got {num_chunks!r}")
  sizes = dict(mesh.shape)
  num_shards = sizes[EXPERT_AXIS]
  axes = token_axes(mesh)
  num_tokens, k = plan.expert_TK.shape
  per_device = -(-num_tokens // (token_shards(mesh) * num_chunks)) * num_chunks
  padded = per_device * token_shards(mesh)
  chunk = per_device // num_chunks
  buffer = exchange_buffer_size(chunk, k, pairs_per_token, num_experts, num_shards,
                                capacity=plan.capacity, buffer_factor=buffer_factor)
  d_ff = weights["wi_EDF"].shape[-1]
  model_sharded = sizes.get(MODEL_AXIS, 1) > 1 and d_ff % sizes[MODEL_AXIS] == 0
  mlp = MODEL_AXIS if model_sharded else None
  weight_specs = {name: P(EXPERT_AXIS, mlp, None) if name == "wo_EFD" else
                  P(EXPERT_AXIS, None, mlp) for name in weights}

  pad = lambda a, value: jnp.pad(a, [(0, padded - num_tokens)] + [(0, 0)] * (a.ndim - 1),
                                 constant_values=value)
  inputs = (pad(x_TD, 0), pad(plan.expert_TK, 0), pad(plan.gate_TK, 0.0),
            pad(plan.keep_TK, False))

  def per_device_fn(x_TD, expert_TK, gate_TK, keep_TK, weights):
    outputs, dropped = [], jnp.zeros((), jnp.int32)
    for c in range(num_chunks):  # unrolled: chunk c + 1's exchange can overlap chunk c's experts
      part = slice(c * chunk, (c + 1) * chunk)
      y_TD, chunk_dropped = _exchange_chunk(
          x_TD[part], expert_TK[part], gate_TK[part], keep_TK[part], weights,
          num_shards=num_shards, buffer=buffer, kind=kind, exchange=exchange,
          model_sharded=model_sharded, implementation=implementation, tile=tile)
      outputs.append(y_TD)
      dropped = dropped + chunk_dropped
    return jnp.concatenate(outputs, axis=0), dropped[None]

  token_spec = P(axes)
  # check_vma=False: the grouped matmul's XLA loop carries fresh (device-invariant) zeros that
  # its body makes device-varying, which the varying-axes type check rejects. Outputs and
  # gradients are the same (the tests compare both with the single-device layer, "model"
  # psum included).
  fn = jax.shard_map(
      per_device_fn, mesh=mesh,
      in_specs=(token_spec, token_spec, token_spec, token_spec, weight_specs),
      out_specs=(token_spec, token_spec), check_vma=False)
  y_TD, dropped_S = fn(*inputs, weights)
  return y_TD[:num_tokens], jnp.sum(dropped_S)
