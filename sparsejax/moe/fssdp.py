"""Fully sharded sparse data parallelism (FSSDP): a step materialises only the experts it uses.

Layout. One mesh axis `axis` (default "fsdp") of n devices splits both the T tokens (T_l = T / n
consecutive tokens per device) and every expert weight, FSDP-style along the model dimension D:
device j holds rows [j D / n, (j + 1) D / n) of each wi_EDF / wg_EDF and the same columns of
each wo_EFD, the "embed" -> "fsdp" rule of `sparsejax.sharding`. Other mesh axes replicate.

Dense all-gather path (FSDP, `all_gather_experts`): every device all-gathers all E experts,
runs its own tokens' pairs through them, and the backward reduce-scatters the E experts'
gradients back to their shards.

Sparse path (`fssdp_experts`), Hecate's FSSDP. A placement P_NM (int32 `[n, M]`; P[i] lists
the experts device i materialises, E marks an empty slot) drives one SparseAllGather per
weight: device j sends device i its shard of the experts P[i] (one `all_to_all` of
`[n, M, D / n, F]`), and i concatenates the n shards of each. Autodiff transposes it into the
SparseReduceScatter: the materialised experts' gradients return to their owners' shards
(`all_to_all` back, scatter-added into the `[E, D / n, F]` shard). Two placements:

  * "local" (`placement_NM=None`): device i materialises exactly the experts its own tokens
    use (`local_placement`, from the plan); tokens never move.
  * load-driven (`placement_NM=load_placement(load_E, n, M)`): heavily loaded experts are
    materialised on several devices; a kept pair (t, k) goes to replica slot_tk mod r_e of its
    expert e (r_e devices hold e; slot_tk is the pair's rank among e's pairs, so e's pairs are
    spread evenly over its replicas), exchanged by `all_to_all` as in `parallel` (worst-case
    buffer of T_l K rows per destination, nothing dropped), and returned.

Static cap. M (`max_experts`, or the placement's width) is static. When the plan needs an
expert on a device that does not materialise it (more than M experts on one device under
"local", an active expert absent from a load placement), the whole step falls back, under
`lax.cond`, to the dense all-gather path: the output stays exact and the returned `overflow`
flag is True. `required_experts` gives the smallest M that avoids it for a concrete plan.

Bytes (`gather_bytes`, `token_exchange_bytes`) are counted from the operand shapes of the
collectives this module issues, per device per forward + backward step: the dense path moves
2 (n - 1) / n E S bytes (S the bytes of one expert, all its weights), the sparse path
2 (n - 1) / n M S, plus the token exchange of a load placement.

Qing et al., 2025, "Hecate: Unlocking Efficient Sparse Model Training via Fully Sharded Sparse
Data Parallelism"; Rajbhandari et al., 2020 (ZeRO) and Zhao et al., 2023 (PyTorch FSDP).
"""
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from sparsejax.moe import parallel
from sparsejax.moe import plan as plan_lib

AXIS = "fsdp"
SHARD_DIMS = {"wi_EDF": 1, "wg_EDF": 1, "wo_EFD": 2}  # the D dimension each weight is split on


def _check(num_tokens: int, weights: dict[str, jax.Array], mesh: Any, axis: str) -> int:
  """n, the size of `axis`; ValueError unless it splits the tokens and D evenly."""
  if mesh is None:
    raise ValueError("FSSDP needs a device mesh: pass mesh= or call inside "
                     "`with jax.set_mesh(mesh):` (see sparsejax.sharding.make_mesh)")
  if axis not in mesh.axis_names:
    raise ValueError(f"axis={axis!r} is not a mesh axis; the mesh has {mesh.axis_names}")
  n = dict(mesh.shape)[axis]
  d_model = weights["wi_EDF"].shape[1]
  if num_tokens % n or d_model % n:
    raise ValueError(f"the {axis!r} axis (size {n}) must divide the number of tokens "
                     f"({num_tokens}) and d_model ({d_model})")
  unknown = set(weights) - set(SHARD_DIMS)
  if unknown:
    raise ValueError(f"unknown expert weights {sorted(unknown)}; allowed: {sorted(SHARD_DIMS)}")
  return n


def need_matrix(plan: plan_lib.DispatchPlan, num_devices: int) -> jax.Array:
  """need_NE[i, e]: whether a kept pair of device i's tokens (block i of T / n) uses expert e."""
  bucket_TK = jnp.where(plan.keep_TK, plan.expert_TK, plan.num_experts)
  bucket_NX = bucket_TK.reshape(num_devices, -1)
  hits_NE = jnp.zeros((num_devices, plan.num_experts + 1), bool).at[
      jnp.arange(num_devices)[:, None], bucket_NX].set(True)
  return hits_NE[:, :plan.num_experts]


def required_experts(plan: plan_lib.DispatchPlan, num_devices: int) -> int:
  """The smallest cap M of the "local" placement for this concrete plan: max_i |{e used on i}|.

  Host-side NumPy (reads the plan's values); at least 1.
  """
  expert_NX = np.asarray(plan.expert_TK).reshape(num_devices, -1)
  keep_NX = np.asarray(plan.keep_TK).reshape(num_devices, -1)
  return max(1, max(len(np.unique(e[k])) for e, k in zip(expert_NX, keep_NX)))


def local_placement(plan: plan_lib.DispatchPlan, num_devices: int,
                    max_experts: int) -> tuple[jax.Array, jax.Array]:
  """Device i materialises the experts its own tokens use, ascending, padded with E.

  Returns (P_NM int32 `[n, M]`, overflow: some device uses more than M experts; its row then
  holds its M lowest ones). Jit-safe.
  """
  need_NE = need_matrix(plan, num_devices)
  num_experts = plan.num_experts
  order_NE = jnp.argsort(~need_NE, axis=1, stable=True).astype(jnp.int32)  # used ones first
  placement_NE = jnp.where(jnp.take_along_axis(need_NE, order_NE, axis=1), order_NE,
                           num_experts)
  placement_NM = jnp.pad(placement_NE, ((0, 0), (0, max(0, max_experts - num_experts))),
                         constant_values=num_experts)[:, :max_experts]
  overflow = jnp.any(jnp.sum(need_NE, axis=1) > max_experts)
  return placement_NM, overflow


def replica_counts(load_E: Any, num_devices: int) -> np.ndarray:
  """r_e = min(n, max(1, ceil(n l_e / sum l))) for an active expert (l_e > 0), else 0.

  One device per 1/n of the step's pairs (Hecate materialises a loaded expert on more
  devices). Host-side NumPy; int64 `[E]`.
  """
  load_E = np.asarray(load_E, np.float64)
  if load_E.ndim != 1 or np.any(load_E < 0):
    raise ValueError(f"load_E must be a 1-D array of loads >= 0, got {load_E}")
  replicas_E = np.zeros(load_E.shape[0], np.int64)
  active = load_E > 0
  if active.any():
    share_E = num_devices * load_E[active] / load_E.sum()
    replicas_E[active] = np.clip(np.ceil(share_E - 1e-9), 1, num_devices)
  return replicas_E


def load_placement(load_E: Any, num_devices: int, max_experts: int | None = None) -> np.ndarray:
  """Load-driven placement: which experts each device materialises, from the step's loads.

  Expert e gets `replica_counts` r_e replicas. Each replica, taken in descending share
  l_e / r_e (ties: lower expert, then earlier replica), goes to the device with the least
  assigned share among those with a free slot that do not hold e yet (ties: lower device):
  LPT scheduling, balancing the pairs each device computes as Hecate's heterogeneous sharding
  does. Host-side NumPy.

  Args:
    load_E: pairs per expert this step (e.g. `plan.group_sizes(plan)`).
    num_devices: n. max_experts: M, slots per device; None for the fewest that place every
      replica (at least ceil(sum r_e / n)).
  Returns:
    P_NM int32 `[n, M]`, each row's experts ascending, empty slots E.
  """
  load_E = np.asarray(load_E, np.float64)
  replicas_E = replica_counts(load_E, num_devices)
  if max_experts is not None:
    return _place(load_E, replicas_E, num_devices, max_experts)
  for max_experts in range(max(1, -(-int(replicas_E.sum()) // num_devices)),
                           load_E.shape[0] + 1):
    try:
      return _place(load_E, replicas_E, num_devices, max_experts)
    except ValueError:
      continue
  raise AssertionError("M = E always places every replica")


def _place(load_E, replicas_E, num_devices, max_experts):
  """`load_placement` with M slots; ValueError when the replicas do not fit."""
  num_experts = load_E.shape[0]
  if replicas_E.sum() > num_devices * max_experts:
    raise ValueError(f"max_experts={max_experts}: the loads need {replicas_E.sum()} expert "
                     f"replicas but {num_devices} devices hold only {num_devices * max_experts}")
  jobs = sorted((-load_E[e] / replicas_E[e], e, r) for e in range(num_experts)
                for r in range(replicas_E[e]))
  assigned = [[] for _ in range(num_devices)]
  share_N = np.zeros(num_devices)
  for neg_share, e, _ in jobs:
    free = [i for i in range(num_devices)
            if len(assigned[i]) < max_experts and e not in assigned[i]]
    if not free:
      raise ValueError(f"max_experts={max_experts}: no device with a free slot is left for a "
                       f"replica of expert {e}; raise max_experts")
    device = min(free, key=lambda i: (share_N[i], i))
    assigned[device].append(e)
    share_N[device] -= neg_share
  placement_NM = np.full((num_devices, max_experts), num_experts, np.int32)
  for i, experts in enumerate(assigned):
    placement_NM[i, :len(experts)] = sorted(experts)
  return placement_NM


def slot_table(placement_NM: jax.Array, num_experts: int) -> jax.Array:
  """slot_NE[i, e]: the slot of expert e in device i's placement row, M where i lacks e."""
  num_devices, max_experts = placement_NM.shape
  table = jnp.full((num_devices, num_experts + 1), max_experts, jnp.int32)
  table = table.at[jnp.arange(num_devices)[:, None], placement_NM].set(
      jnp.arange(max_experts, dtype=jnp.int32)[None])
  return table[:, :num_experts]


def choose_replicas(plan: plan_lib.DispatchPlan, placement_NM: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where each pair runs under a load placement: replica slot_tk mod r_e of its expert.

  Returns (dest_TK device, local_TK the expert's slot there, overflow: a kept pair's expert
  is on no device).
  """
  num_devices, max_experts = placement_NM.shape
  slot_NE = slot_table(placement_NM, plan.num_experts)
  held_NE = slot_NE < max_experts
  replicas_E = jnp.sum(held_NE, axis=0)
  devices_EN = jnp.argsort(~held_NE.T, axis=1, stable=True).astype(jnp.int32)
  replica_TK = plan.slot_TK % jnp.maximum(replicas_E[plan.expert_TK], 1)
  dest_TK = jnp.take_along_axis(devices_EN[plan.expert_TK], replica_TK[..., None], axis=-1)[..., 0]
  local_TK = slot_NE[dest_TK, plan.expert_TK]
  overflow = jnp.any(plan.keep_TK & (replicas_E[plan.expert_TK] == 0))
  return dest_TK, local_TK, overflow


def sparse_all_gather(w_shard: jax.Array, placement_NM: jax.Array, shard_dim: int,
                      axis: str) -> jax.Array:
  """SparseAllGather inside `shard_map`: the full weights of the experts P[me], `[M, ...]`.

  Device j sends device i its shard w_shard[P[i]] (zeros for empty slots); the receiver
  concatenates the n shards along `shard_dim`. Its transpose (autodiff) is the
  SparseReduceScatter.
  """
  send = jnp.take(w_shard, placement_NM, axis=0, mode="fill", fill_value=0)
  recv = jax.lax.all_to_all(send, axis, 0, 0)
  recv = jnp.moveaxis(recv, 0, shard_dim)
  shape = recv.shape
  return recv.reshape(shape[:shard_dim] + (shape[shard_dim] * shape[shard_dim + 1],)
                      + shape[shard_dim + 2:])


def _run_pairs(x_TD, local_TK, gate_TK, keep_TK, weights, kind, implementation, tile):
  """y_t = sum_k g_tk FFN_{local_tk}(x_t) with the materialised experts `weights` ([M, ...])."""
  num_tokens, k = local_TK.shape
  num_local = weights["wi_EDF"].shape[0]
  local_R = jnp.where(keep_TK, local_TK, num_local).reshape(-1)
  x_RD = jnp.repeat(x_TD, k, axis=0)
  y_RD = parallel.run_local_experts(x_RD, local_R, weights, kind,
                                    implementation=implementation, tile=tile)
  gate_TK = jnp.where(keep_TK, gate_TK, 0.0).astype(jnp.float32)
  y_TKD = y_RD.reshape(num_tokens, k, -1).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", y_TKD, gate_TK).astype(x_TD.dtype)


def _exchange_pairs(x_TD, dest_TK, local_TK, gate_TK, keep_TK, weights, kind, num_devices,
                    axis, implementation, tile):
  """As `_run_pairs`, each pair running on device dest_tk (all_to_all there and back)."""
  num_tokens, k = dest_TK.shape
  num_local = weights["wi_EDF"].shape[0]
  buffer = num_tokens * k
  virtual_TK = dest_TK * num_local + jnp.minimum(local_TK, num_local - 1)
  row_TK, pair_R, local_R, _ = parallel.pack(virtual_TK, keep_TK, num_devices, num_local,
                                             buffer)
  x_RD = jnp.take(x_TD, pair_R // k, axis=0, mode="fill", fill_value=0)
  exchange = lambda v: jax.lax.all_to_all(v.reshape(num_devices, buffer, *v.shape[1:]), axis,
                                          0, 0).reshape(v.shape)
  y_RD = parallel.run_local_experts(exchange(x_RD), exchange(local_R), weights, kind,
                                    implementation=implementation, tile=tile)
  y_TKD = jnp.take(exchange(y_RD), row_TK, axis=0, mode="fill", fill_value=0)
  gate_TK = jnp.where(keep_TK, gate_TK, 0.0).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), gate_TK).astype(x_TD.dtype)


def _gather_all(weights, axis):
  return {name: jax.lax.all_gather(w, axis, axis=SHARD_DIMS[name], tiled=True)
          for name, w in weights.items()}


def _shard_map(fn, mesh, axis, weights, num_token_inputs, num_replicated):
  """`shard_map` of fn(token inputs..., replicated inputs..., weights) -> tokens over `axis`."""
  weight_specs = {name: P(*[axis if d == SHARD_DIMS[name] else None for d in range(3)])
                  for name in weights}
  # check_vma=False: the grouped matmul's loop carries device-invariant zeros that its body
  # makes device-varying (see `parallel.expert_parallel_experts`).
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(axis),) * num_token_inputs
                       + (P(),) * num_replicated + (weight_specs,),
                       out_specs=P(axis), check_vma=False)


def all_gather_experts(x_TD: jax.Array, plan: plan_lib.DispatchPlan,
                       weights: dict[str, jax.Array], kind: str, *, mesh: Any = None,
                       axis: str = AXIS, implementation: str = "auto",
                       tile: int = 128) -> jax.Array:
  """The dense FSDP path: y_t = sum_k g_tk FFN_{e_tk}(x_t) with every expert gathered everywhere.

  Args as `fssdp_experts`. Returns y_TD, tokens sharded over `axis`.
  """
  mesh = parallel.current_mesh() if mesh is None else mesh
  _check(plan.num_tokens, weights, mesh, axis)

  def per_device(x_TD, expert_TK, gate_TK, keep_TK, weights):
    return _run_pairs(x_TD, expert_TK, gate_TK, keep_TK, _gather_all(weights, axis), kind,
                      implementation, tile)

  fn = _shard_map(per_device, mesh, axis, weights, 4, 0)
  return fn(x_TD, plan.expert_TK, plan.gate_TK, plan.keep_TK, weights)


def fssdp_experts(x_TD: jax.Array, plan: plan_lib.DispatchPlan, weights: dict[str, jax.Array],
                  kind: str, *, max_experts: int | None = None,
                  placement_NM: jax.Array | None = None, mesh: Any = None, axis: str = AXIS,
                  implementation: str = "auto", tile: int = 128) -> tuple[jax.Array, jax.Array]:
  """y_t = sum_k g_tk FFN_{e_tk}(x_t), materialising only the experts the step uses (FSSDP).

  Equal to `all_gather_experts` (and to the single-device layer), gradients included.

  Args:
    x_TD: all T tokens (sharded over `axis` inside). plan: their global plan (any router).
    weights: the stacked experts {"wi_EDF", "wo_EFD"(, "wg_EDF")} of all E experts.
    kind: "ffn" or "swiglu".
    max_experts: M of the "local" placement (each device materialises the <= M experts its
      tokens use); exactly one of max_experts and placement_NM.
    placement_NM: a load-driven placement (`load_placement`); tokens move to their replicas.
    mesh, axis: the mesh (default: the one set by `jax.set_mesh`) and the axis splitting tokens
      and weights. implementation, tile: the grouped matmul's (`kernels.gmm`).
  Returns:
    (y_TD, overflow: True when the placement missed a needed expert and the step ran the dense
    all-gather path instead).
  """
  mesh = parallel.current_mesh() if mesh is None else mesh
  num_devices = _check(plan.num_tokens, weights, mesh, axis)
  if (max_experts is None) == (placement_NM is None):
    raise ValueError("pass exactly one of max_experts (local placement) and placement_NM "
                     f"(load placement), got max_experts={max_experts} and "
                     f"placement_NM={'None' if placement_NM is None else 'an array'}")
  moves_tokens = placement_NM is not None
  if moves_tokens:
    placement_NM = jnp.asarray(placement_NM, jnp.int32)
    if placement_NM.ndim != 2 or placement_NM.shape[0] != num_devices:
      raise ValueError(f"placement_NM must have shape ({num_devices}, M), got "
                       f"{placement_NM.shape}")
    dest_TK, local_TK, overflow = choose_replicas(plan, placement_NM)
  else:
    if isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < 1:
      raise ValueError(f"max_experts must be an int >= 1, got {max_experts!r}")
    placement_NM, overflow = local_placement(plan, num_devices, max_experts)
    device_T = jnp.arange(plan.num_tokens) // (plan.num_tokens // num_devices)
    dest_TK = jnp.broadcast_to(device_T[:, None], plan.expert_TK.shape)
    local_TK = slot_table(placement_NM, plan.num_experts)[dest_TK, plan.expert_TK]

  def per_device(x_TD, expert_TK, dest_TK, local_TK, gate_TK, keep_TK, placement_NM, overflow,
                 weights):
    def sparse(weights):
      materialised = {name: sparse_all_gather(w, placement_NM, SHARD_DIMS[name], axis)
                      for name, w in weights.items()}
      if moves_tokens:
        return _exchange_pairs(x_TD, dest_TK, local_TK, gate_TK, keep_TK, materialised, kind,
                               num_devices, axis, implementation, tile)
      return _run_pairs(x_TD, local_TK, gate_TK, keep_TK, materialised, kind, implementation,
                        tile)

    def dense(weights):
      return _run_pairs(x_TD, expert_TK, gate_TK, keep_TK, _gather_all(weights, axis), kind,
                        implementation, tile)

    return jax.lax.cond(overflow, dense, sparse, weights)

  fn = _shard_map(per_device, mesh, axis, weights, 6, 2)
  y_TD = fn(x_TD, plan.expert_TK, dest_TK, local_TK, plan.gate_TK, plan.keep_TK, placement_NM,
            overflow, weights)
  return y_TD, overflow


def expert_bytes(weights: dict[str, Any]) -> int:
  """S: bytes of one expert, all its weights (shapes and dtypes of the stacked `[E, ...]`)."""
  return sum(math.prod(w.shape[1:]) * jnp.dtype(w.dtype).itemsize for w in weights.values())


def gather_bytes(num_experts: int, expert_size: int, num_devices: int) -> int:
  """Bytes one device sends gathering `num_experts` experts of S bytes, forward + backward.

  Forward: an all-gather (or the sparse all_to_all) in which a device sends its 1 / n shard
  of each expert to the n - 1 others: (n - 1) / n E' S; the backward's reduce-scatter moves
  the same. Total 2 (n - 1) E' S / n, with E' = E (dense) or M (sparse).
  """
  return 2 * (num_devices - 1) * num_experts * expert_size // num_devices


def token_exchange_bytes(tokens_per_device: int, k: int, d_model: int, num_devices: int,
                         itemsize: int) -> int:
  """Bytes one device sends moving its pairs under a load placement, forward + backward.

  Buffer of B = T_l K rows per destination: rows out and results back in the forward, their
  cotangents in the backward (4 (n - 1) B D itemsize), plus the rows' int32 expert slots.
  """
  buffer = tokens_per_device * k
  return (4 * parallel.all_to_all_bytes(buffer, d_model, num_devices, itemsize)
          + parallel.all_to_all_bytes(buffer, 1, num_devices, 4))
