"""Routers: pure functions from router logits (or token ids) to a `DispatchPlan`.

Every router returns `(plan, aux)`, where `aux` is a dict of float32 arrays (router
probabilities and telemetry) plus, for routers with a training loss, `aux["losses"]`: a dict of
unweighted scalar losses. Logit routers compute in float32 whatever the input dtype, take
`k` (choices per token, or the average for expert choice) and are registered in `ROUTERS`.
Routers that behave differently in training take `deterministic` (and `rng` for randomness);
the MoE layer passes them to routers whose signature has them.
Token-choice routers return dropless plans; `sparsejax.moe.plan.apply_capacity` adds a capacity.
"""
import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.moe import assignment
from sparsejax.moe import balance
from sparsejax.moe import plan as plan_lib
from sparsejax.registry import ROUTERS

ORDERS = ("softmax_then_topk", "topk_then_softmax")


def check_k(k: int, num_experts: int) -> None:
  """ValueError unless 1 <= k <= num_experts."""
  if not 1 <= k <= num_experts:
    raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")


def apply_jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
  """Multiplicative router noise x * u, u ~ U[1 - eps, 1 + eps] elementwise (training only).

  Switch Transformer (Fedus et al., 2021) applies it to the router input.
  """
  if not 0 <= eps < 1:
    raise ValueError(f"jitter eps must be in [0, 1), got {eps}")
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def router_entropy(probs_TE: jax.Array) -> jax.Array:
  """Mean over tokens (all leading axes) of -sum_e p_te log p_te."""
  return jnp.mean(-jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1))


def _softmax_aux(probs_TE: jax.Array) -> dict[str, jax.Array]:
  return {"probs_TE": probs_TE, "entropy": router_entropy(probs_TE)}


@ROUTERS.register("top_k")
def route_top_k(logits_TE: jax.Array, *, k: int, order: str = "softmax_then_topk",
                renormalize: bool = False, bias_E: jax.Array | None = None):
  """Each token picks its k highest-scoring experts.

  softmax_then_topk: p = softmax(logits); gates g_tk = p[t, e_tk] (Switch for k = 1, GShard
  for k = 2); with `renormalize` g_tk /= sum_k g_tk. topk_then_softmax: gates are the softmax
  of the k selected logits (Mixtral). With `bias_E` (aux-loss-free balancing, Wang et al.,
  2024), experts are selected by logits + stop_gradient(bias) but gates use unbiased logits.
  Ties go to the lower expert index.

  Returns:
    (dropless DispatchPlan with K = k, {"probs_TE", "entropy"}).
  """
  num_experts = logits_TE.shape[-1]
  check_k(k, num_experts)
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
  logits_TE = logits_TE.astype(jnp.float32)
  select_TE = logits_TE
  if bias_E is not None:
    select_TE = logits_TE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  _, expert_TK = jax.lax.top_k(select_TE, k)
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  if order == "softmax_then_topk":
    gate_TK = jnp.take_along_axis(probs_TE, expert_TK, axis=-1)
    if renormalize:
      gate_TK = gate_TK / jnp.sum(gate_TK, axis=-1, keepdims=True)
  else:
    gate_TK = jax.nn.softmax(jnp.take_along_axis(logits_TE, expert_TK, axis=-1), axis=-1)
  valid_TK = jnp.ones(expert_TK.shape, bool)
  plan = plan_lib.plan_from_choices(expert_TK, gate_TK, valid_TK, num_experts)
  return plan, _softmax_aux(probs_TE)


@ROUTERS.register("expert_choice")
def route_expert_choice(logits_TE: jax.Array, *, k: int = 1, capacity_factor: float = 1.0,
                        capacity_multiple: int = 1):
  """Each expert takes its C highest-probability tokens, C = ceil(T * k * cf / E).

  p = softmax(logits) over experts; expert e keeps top-C of p[:, e] over tokens with gate
  p[t, e] (Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing"). k is the
  average number of experts per token. The plan has K = E choices per token (choice e is
  expert e), kept where expert e chose the token, and capacity C; every expert holds exactly C
  tokens. Ties go to the lower token index. Routing looks at all T tokens, so it is not causal.

  Returns:
    (DispatchPlan with K = E and capacity C,
     {"probs_TE", "entropy", "coverage": fraction of tokens taken by >= 1 expert,
      "experts_per_token": mean number of experts per token}).
  """
  num_tokens, num_experts = logits_TE.shape
  check_k(k, num_experts)
  capacity = plan_lib.compute_capacity(num_tokens, k, num_experts, capacity_factor,
                                       capacity_multiple)
  if capacity > num_tokens:
    raise ValueError(f"expert-choice capacity must be <= num_tokens={num_tokens}, got "
                     f"{capacity} (k={k}, capacity_factor={capacity_factor})")
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  _, token_EC = jax.lax.top_k(probs_TE.T, capacity)
  expert_EC = jnp.broadcast_to(jnp.arange(num_experts)[:, None], token_EC.shape)
  slot_EC = jnp.broadcast_to(jnp.arange(capacity)[None, :], token_EC.shape)
  keep_TE = jnp.zeros((num_tokens, num_experts), bool).at[token_EC, expert_EC].set(True)
  slot_TE = jnp.zeros((num_tokens, num_experts), jnp.int32).at[token_EC, expert_EC].set(slot_EC)
  plan = plan_lib.DispatchPlan(
      expert_TK=jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), keep_TE.shape),
      gate_TK=jnp.where(keep_TE, probs_TE, 0.0),
      slot_TK=slot_TE,
      keep_TK=keep_TE,
      num_experts=num_experts,
      capacity=capacity)
  experts_per_token_T = jnp.sum(keep_TE, axis=-1)
  aux = _softmax_aux(probs_TE)
  aux["coverage"] = jnp.mean((experts_per_token_T > 0).astype(jnp.float32))
  aux["experts_per_token"] = jnp.mean(experts_per_token_T.astype(jnp.float32))
  return plan, aux


@ROUTERS.register("threshold")
def route_threshold(logits_TE: jax.Array, *, k: int, p: float = 0.5,
                    renormalize: bool = False):
  """Dynamic-k: a token takes experts by descending probability until their sum reaches p.

  With p_(1) >= p_(2) >= ... the sorted probabilities, choice i is taken iff
  sum_{j < i} p_(j) < p and i < k (k caps the number of experts); the first choice is always
  taken. Gates are the taken probabilities, optionally renormalised to sum to 1 (Huang et al.,
  2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

  Returns:
    (dropless DispatchPlan with K = k, untaken choices not kept,
     {"probs_TE", "entropy", "experts_per_token"}).
  """
  num_experts = logits_TE.shape[-1]
  check_k(k, num_experts)
  if not 0 < p <= 1:
    raise ValueError(f"p must be in (0, 1], got {p}")
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  sorted_TK, expert_TK = jax.lax.top_k(probs_TE, k)
  before_TK = jnp.cumsum(sorted_TK, axis=-1) - sorted_TK
  valid_TK = before_TK < p
  gate_TK = jnp.where(valid_TK, sorted_TK, 0.0)
  if renormalize:
    gate_TK = gate_TK / jnp.sum(gate_TK, axis=-1, keepdims=True)
  plan = plan_lib.plan_from_choices(expert_TK, gate_TK, valid_TK, num_experts)
  aux = _softmax_aux(probs_TE)
  aux["experts_per_token"] = jnp.mean(jnp.sum(valid_TK, axis=-1).astype(jnp.float32))
  return plan, aux


@ROUTERS.register("balanced")
def route_balanced(logits_TE: jax.Array, *, k: int = 1, deterministic: bool = False,
                   temperature: float = 0.05, num_sinkhorn_iters: int = 50):
  """BASE layers: in training every expert gets exactly T / E tokens, maximising total score.

  Training: e_t solves max sum_t logits[t, e_t] s.t. each expert holds C = T / E tokens
  (`assignment.balanced_assignment`: Sinkhorn prices, then exact shortest-path repairs); the
  plan has capacity C and drops nothing. Inference (`deterministic`): greedy e_t = argmax_e
  logits[t, e], a dropless plan. Gates are sigmoid(logits[t, e_t]) in both (Lewis et al., 2021,
  "BASE Layers: Simplifying Training of Large, Sparse Models"). Balanced by construction, so
  the layer's load-balance loss is not needed (load_balance_weight=0). Requires k = 1 and T a
  multiple of E.

  Returns:
    (DispatchPlan with K = 1, capacity T / E in training and None at inference,
     {"probs_TE": softmax(logits), "entropy", "top1_agreement": fraction of tokens whose
      expert is their argmax}).
  """
  num_tokens, num_experts = logits_TE.shape
  if k != 1:
    raise ValueError(f"k must be 1 for balanced assignment (one expert per token), got {k}")
  capacity = assignment.check_balanced_args(num_tokens, num_experts, temperature,
                                            num_sinkhorn_iters)
  logits_TE = logits_TE.astype(jnp.float32)
  top1_T = jnp.argmax(logits_TE, axis=-1).astype(jnp.int32)
  if deterministic:
    expert_T = top1_T
  else:
    expert_T = assignment.balanced_assignment(logits_TE, temperature=temperature,
                                              num_sinkhorn_iters=num_sinkhorn_iters)
  expert_TK = expert_T[:, None]
  gate_TK = jax.nn.sigmoid(jnp.take_along_axis(logits_TE, expert_TK, axis=-1))
  plan = plan_lib.plan_from_choices(expert_TK, gate_TK, jnp.ones(expert_TK.shape, bool),
                                    num_experts)
  if not deterministic:
    plan = plan.replace(capacity=capacity)
  aux = _softmax_aux(jax.nn.softmax(logits_TE, axis=-1))
  aux["top1_agreement"] = jnp.mean((expert_T == top1_T).astype(jnp.float32))
  return plan, aux


def avg_k_logits(x_TD: jax.Array, w_EDF: jax.Array) -> jax.Array:
  """Avg-K block scores logits[t, e] = x_t . mean_f w[e, :, f], in float32.

  Expert e is a block of F memory keys (columns of its first-layer weight); its score is the
  token's dot product with the block's mean key (Liu et al., 2023, "Towards A Unified View of
  Sparse Feed-Forward Network in Pretraining Large Language Model").
  """
  mean_key_ED = jnp.mean(w_EDF.astype(jnp.float32), axis=-1)
  return x_TD.astype(jnp.float32) @ mean_key_ED.T


# Routers whose logits come from the expert weights instead of a router matmul: name ->
# logits_fn(x_TD, wi_EDF). The MoE layer routes these with no router params.
EXPERT_LOGITS = {"avg_k": avg_k_logits}


@ROUTERS.register("avg_k")
def route_avg_k(logits_TE: jax.Array, *, k: int):
  """Avg-K: each token takes the k blocks with the largest `avg_k_logits`, gate 1.

  The selected blocks' FFN outputs are summed unweighted, each a partial sum of the dense FFN
  over its F keys (Liu et al., 2023). There are no router parameters; the paper uses no
  balancing or z-loss (load_balance_weight=0, z_loss_weight=0). Ties go to the lower expert
  index.

  Returns:
    (dropless DispatchPlan with K = k, {"probs_TE": softmax(logits), "entropy"}).
  """
  num_experts = logits_TE.shape[-1]
  check_k(k, num_experts)
  logits_TE = logits_TE.astype(jnp.float32)
  _, expert_TK = jax.lax.top_k(logits_TE, k)
  ones_TK = jnp.ones(expert_TK.shape, bool)
  plan = plan_lib.plan_from_choices(expert_TK, ones_TK.astype(jnp.float32), ones_TK,
                                    num_experts)
  return plan, _softmax_aux(jax.nn.softmax(logits_TE, axis=-1))


@ROUTERS.register("prototype")
def route_prototype(logits_TE: jax.Array, *, k: int):
  """Expert prototyping ("k top-1"): E experts in k groups of M = E / k, top-1 in each group.

  Group g holds experts [g M, (g + 1) M); with p[t, g, :] = softmax of the token's logits over
  group g, choice g is e = g M + argmax_m p[t, g, m] with gate max_m p[t, g, m], so a token
  uses k experts, one per group (Yang et al., 2021, "M6-T: Exploring Sparse Expert Models and
  Beyond"). Ties go to the lower expert index.

  Returns:
    (dropless DispatchPlan with K = k, {"probs_TE": p / k (sums to 1 per token), "entropy"}).
  """
  num_tokens, num_experts = logits_TE.shape
  check_k(k, num_experts)
  if num_experts % k:
    raise ValueError(f"k must divide num_experts={num_experts} for expert prototyping "
                     f"(k groups of num_experts / k), got {k}")
  group_size = num_experts // k
  probs_TGM = jax.nn.softmax(
      logits_TE.astype(jnp.float32).reshape(num_tokens, k, group_size), axis=-1)
  member_TK = jnp.argmax(probs_TGM, axis=-1)
  gate_TK = jnp.max(probs_TGM, axis=-1)
  expert_TK = member_TK + group_size * jnp.arange(k)[None, :]
  plan = plan_lib.plan_from_choices(expert_TK, gate_TK, jnp.ones(expert_TK.shape, bool),
                                    num_experts)
  return plan, _softmax_aux(probs_TGM.reshape(num_tokens, num_experts) / k)


def _num_dropped(rate: float, cluster_size: int) -> int:
  """floor(rate * c), ignoring float error below 1e-6 (0.29 * 100 drops 29)."""
  return math.floor(round(rate * cluster_size, 6))


def cluster_dropout_keep(rng: jax.Array, num_experts: int, cluster_size: int,
                         rate: float) -> jax.Array:
  """Which experts survive cluster-level expert dropout, bool `[E]`.

  Experts [c i, c (i + 1)) form cluster i; in every cluster floor(rate * c) experts, drawn
  uniformly without replacement, are dropped (MoEC, Xie et al., 2023).
  """
  num_drop = _num_dropped(rate, cluster_size)
  noise_GC = jax.random.uniform(rng, (num_experts // cluster_size, cluster_size))
  rank_GC = jnp.argsort(jnp.argsort(noise_GC, axis=-1), axis=-1)
  return (rank_GC >= num_drop).reshape(num_experts)


def _check_clusters(num_experts: int, k: int, cluster_size: int, expert_dropout: float) -> None:
  """ValueError unless c divides E and the dropout leaves each cluster one and all >= k experts."""
  if cluster_size < 1 or num_experts % cluster_size:
    raise ValueError(f"cluster_size must divide num_experts={num_experts}, got {cluster_size}")
  if not 0 <= expert_dropout < 1:
    raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
  num_drop = _num_dropped(expert_dropout, cluster_size)
  survivors = num_experts - num_experts // cluster_size * num_drop
  if num_drop >= cluster_size or survivors < k:
    raise ValueError(f"expert_dropout={expert_dropout} drops {num_drop} of every "
                     f"{cluster_size} experts, leaving {survivors}; each cluster needs a "
                     f"survivor and at least k={k} must survive")


@ROUTERS.register("moec")
def route_moec(logits_TE: jax.Array, *, k: int, cluster_size: int, expert_dropout: float = 0.0,
               order: str = "softmax_then_topk", renormalize: bool = False,
               rng: jax.Array | None = None, deterministic: bool = False):
  """MoEC: top-k routing over experts in clusters, a variance constraint and expert dropout.

  Experts [c i, c (i + 1)) form cluster i. The loss `balance.cluster_variance_loss` on p =
  softmax(logits) pulls experts of one cluster towards equal routing probabilities, so they
  learn alike and can stand in for one another. In training (not `deterministic`, `rng` given)
  cluster-level expert dropout removes floor(expert_dropout * c) random experts of every
  cluster for the whole call (`cluster_dropout_keep`): their logits become -inf, so their
  tokens go to the surviving experts. Selection and gates are then `route_top_k`'s (`order`,
  `renormalize`) on the surviving experts. Xie et al., 2023, "MoEC: Mixture of Expert
  Clusters".

  Returns:
    (dropless DispatchPlan with K = k, {"probs_TE": softmax over surviving experts, "entropy",
     "losses": {"cluster_variance": the unweighted loss}}).
  """
  num_experts = logits_TE.shape[-1]
  check_k(k, num_experts)
  _check_clusters(num_experts, k, cluster_size, expert_dropout)
  logits_TE = logits_TE.astype(jnp.float32)
  select_TE = logits_TE
  if expert_dropout > 0 and not deterministic:
    if rng is None:
      raise ValueError("expert_dropout > 0 needs rng when not deterministic")
    keep_E = cluster_dropout_keep(rng, num_experts, cluster_size, expert_dropout)
    select_TE = jnp.where(keep_E[None, :], logits_TE, -jnp.inf)
  plan, aux = route_top_k(select_TE, k=k, order=order, renormalize=renormalize)
  probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  aux["losses"] = {"cluster_variance": balance.cluster_variance_loss(probs_TE, cluster_size)}
  return plan, aux


@ROUTERS.register("hash")
def route_hash(token_ids_T: jax.Array, *, table_V: jax.Array, num_experts: int):
  """Token t goes to expert table_V[id_t] with gate 1: no parameters, no balancing loss.

  Hash Layers (Roller et al., 2021). Build `table_V` with `make_hash_table` or
  `make_balanced_hash_table`.

  Returns:
    (dropless DispatchPlan with K = 1, {}).
  """
  expert_TK = jnp.take(table_V, token_ids_T, axis=0)[:, None]
  ones_TK = jnp.ones(expert_TK.shape, bool)
  plan = plan_lib.plan_from_choices(expert_TK, ones_TK.astype(jnp.float32), ones_TK,
                                    num_experts)
  return plan, {}


def make_hash_table(vocab_size: int, num_experts: int, seed: int = 0) -> np.ndarray:
  """A fixed random expert per token id: int32 `[V]`, uniform over [0, E) (Roller et al., 2021)."""
  if vocab_size < 1 or num_experts < 1:
    raise ValueError(f"vocab_size and num_experts must be >= 1, got {vocab_size} and "
                     f"{num_experts}")
  return np.random.default_rng(seed).integers(0, num_experts, vocab_size).astype(np.int32)


def make_balanced_hash_table(freqs_V: np.ndarray, num_experts: int) -> np.ndarray:
  """Token ids packed into experts so that expected loads are balanced: int32 `[V]`.

  Greedy largest-first bin packing (LPT): ids in descending frequency each go to the expert
  with the least total frequency so far (ties to the lower expert). Its max load is at most
  4/3 of optimal, and close to the mean when no single token dominates (Roller et al., 2021,
  "balanced assignment").
  """
  freqs_V = np.asarray(freqs_V, np.float64)
  if freqs_V.ndim != 1 or np.any(freqs_V < 0):
    raise ValueError(f"freqs must be a non-negative vector, got shape {freqs_V.shape}")
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {num_experts}")
  table_V = np.zeros(freqs_V.shape[0], np.int32)
  heap = [(0.0, e) for e in range(num_experts)]
  for token in np.argsort(-freqs_V, kind="stable"):
    load, e = heapq.heappop(heap)
    table_V[token] = e
    heapq.heappush(heap, (load + freqs_V[token], e))
  return table_V
