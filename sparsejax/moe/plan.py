"""Dispatch plans: which expert and buffer slot each (token, choice) pair uses.

A router turns logits into a `DispatchPlan`; dispatch and combine only read the plan. Plans
are pytrees, so they pass through `jit`, `vmap` and `scan` like arrays.
"""
import math

import flax.struct
import jax
import jax.numpy as jnp

PRIORITIES = ("position", "score")


@flax.struct.dataclass
class DispatchPlan:
  """Assignment of T tokens, K choices each, to E experts.

  Invariants (checked by the property tests):
    * `expert_TK` is int32 in [0, num_experts).
    * `gate_TK` is float32, >= 0, and 0 wherever `keep_TK` is False; for softmax routers the
      gates of one token sum to at most 1.
    * `slot_TK` is int32; where `keep_TK` it is the pair's rank among the kept pairs of the same
      expert, so kept pairs of one expert hold slots 0, 1, 2, ... without gaps or repeats.
      Where `keep_TK` is False it carries no meaning.
    * `capacity` is None for a dropless plan (every routed pair is kept and an expert's slots
      run up to its group size), else every kept slot is < capacity and an expert's buffer is
      `[capacity, D]`.
  """
  expert_TK: jax.Array
  gate_TK: jax.Array
  slot_TK: jax.Array
  keep_TK: jax.Array
  num_experts: int = flax.struct.field(pytree_node=False)
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_tokens(self) -> int:
    return self.expert_TK.shape[0]

  @property
  def k(self) -> int:
    return self.expert_TK.shape[1]


def compute_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float,
                     multiple: int = 1) -> int:
  """Expert buffer size C = ceil(T * k * cf / E), rounded up to a multiple of `multiple`.

  Follows GShard (Lepikhin et al., 2020) and Switch Transformer (Fedus et al., 2021).
  """
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  if multiple < 1:
    raise ValueError(f"capacity multiple must be >= 1, got {multiple}")
  capacity = math.ceil(num_tokens * k * capacity_factor / num_experts)
  return max(multiple, -(-capacity // multiple) * multiple)


def token_priority(plan: DispatchPlan, priority: str,
                   score_T: jax.Array | None = None) -> jax.Array:
  """Token order in which pairs claim slots: `order_T[i]` is the i-th token to choose.

  "position": token order 0..T-1. "score": Batch Priority Routing (Riquelme et al., 2021,
  V-MoE): tokens by descending score_T, ties by position, one rank for all of a token's
  choices. BPR's score is the router's top-1 probability max_e p_te; `score_T` defaults to the
  token's largest gate, which is that probability only when the gates are unrenormalised
  softmax probabilities (pass score_T for renormalised or top-k-softmax gates).
  """
  if priority not in PRIORITIES:
    raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
  if priority == "position":
    return jnp.arange(plan.num_tokens, dtype=jnp.int32)
  if score_T is None:
    score_T = jnp.max(plan.gate_TK, axis=1)
  elif score_T.shape != (plan.num_tokens,):
    raise ValueError(f"score_T must have shape (num_tokens,) = {(plan.num_tokens,)}, got "
                     f"{score_T.shape}")
  return jnp.argsort(-score_T, stable=True).astype(jnp.int32)


def rank_within_expert(expert_TK: jax.Array, valid_TK: jax.Array, num_experts: int,
                       order_T: jax.Array) -> jax.Array:
  """Slot of each valid pair: how many valid pairs of its expert come before it.

  Pairs are visited choice-major (all first choices, then all second choices, ...) and, within
  one choice, in token order `order_T`, as in GShard / Flaxformer top-k dispatch. Computed with
  one stable sort by expert, O(TK log TK), independent of E.
  """
  num_tokens, k = expert_TK.shape
  bucket_TK = jnp.where(valid_TK, expert_TK, num_experts)
  bucket_P = bucket_TK[order_T].T.reshape(-1)
  perm_P = jnp.argsort(bucket_P, stable=True)
  counts = jnp.bincount(bucket_P, length=num_experts + 1)
  starts = jnp.cumsum(counts) - counts
  sorted_bucket_P = bucket_P[perm_P]
  rank_sorted_P = jnp.arange(bucket_P.shape[0], dtype=jnp.int32) - starts[sorted_bucket_P]
  rank_P = jnp.zeros_like(rank_sorted_P).at[perm_P].set(rank_sorted_P, unique_indices=True)
  rank_ordered_TK = rank_P.reshape(k, num_tokens).T
  return jnp.zeros_like(rank_ordered_TK).at[order_T].set(rank_ordered_TK, unique_indices=True)


def plan_from_choices(expert_TK: jax.Array, gate_TK: jax.Array, valid_TK: jax.Array,
                      num_experts: int) -> DispatchPlan:
  """A dropless plan keeping every valid choice; slots are ranks in position order."""
  expert_TK = expert_TK.astype(jnp.int32)
  valid_TK = valid_TK.astype(bool)
  order_T = jnp.arange(expert_TK.shape[0], dtype=jnp.int32)
  return DispatchPlan(
      expert_TK=expert_TK,
      gate_TK=jnp.where(valid_TK, gate_TK, 0.0).astype(jnp.float32),
      slot_TK=rank_within_expert(expert_TK, valid_TK, num_experts, order_T),
      keep_TK=valid_TK,
      num_experts=num_experts,
      capacity=None)


def apply_capacity(plan: DispatchPlan, capacity: int, priority: str = "position",
                   score_T: jax.Array | None = None) -> DispatchPlan:
  """Drop the pairs that find their expert's `capacity` slots already taken.

  Slots are re-ranked in `priority` order (see `token_priority`, which takes `score_T`); a
  pair is kept iff it was kept before and its rank is < capacity. Dropped pairs get gate 0 (the
  token passes through the residual only), as in Switch Transformer (Fedus et al., 2021).
  """
  if plan.capacity is not None:
    raise ValueError(f"plan already has capacity {plan.capacity}; apply_capacity needs a "
                     "dropless plan")
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  order_T = token_priority(plan, priority, score_T)
  slot_TK = rank_within_expert(plan.expert_TK, plan.keep_TK, plan.num_experts, order_T)
  keep_TK = plan.keep_TK & (slot_TK < capacity)
  return plan.replace(
      gate_TK=jnp.where(keep_TK, plan.gate_TK, 0.0),
      slot_TK=slot_TK,
      keep_TK=keep_TK,
      capacity=capacity)


def group_sizes(plan: DispatchPlan) -> jax.Array:
  """Number of kept pairs per expert, int32 `[E]`."""
  bucket_TK = jnp.where(plan.keep_TK, plan.expert_TK, plan.num_experts)
  return jnp.bincount(bucket_TK.reshape(-1), length=plan.num_experts + 1)[:-1].astype(jnp.int32)
