"""The token-routed MoE FFN as one pure function: route -> capacity -> experts -> aux.

`moe_apply(params, x_TD, router_fn=..., expert_fn=...)` runs the whole layer on T tokens:

  routed  = router_fn(params, x_TD, bias_E)       # the router's plan, logits and aux
  plan    = capacity limit of routed.plan         # GShard buffers, dropping by priority
  y_TD    = expert_fn(params, x_TD, plan)         # dispatch, experts, gate-weighted combine
  aux     = losses and load / router telemetry

Router and expert functions are plugged in; the Linen layers own params and state and build
them from their fields:

  layer                    router function                 expert function
  "moe", "conv_moe"        `route_logits` (any logit       `ffn_experts` (stacked FFNs,
                           router in `ROUTERS`)            grouped matmul or expert parallel)
  "hash_moe"               `hash_layer.route_token_ids`    `ffn_experts`
  "lora_moe"               `route_logits`                  `lora_experts.lora_moe_experts`

`params` is the layer's flat dict of arrays (already in the compute dtype), e.g. {"router_DE",
"wi_EDF", "wo_EFD"}; each function reads the names it documents. Everything here is jit- and
vmap-safe (`ffn_experts` on one device; its expert-parallel path runs in a `shard_map` over
the mesh set by `jax.set_mesh`).
"""
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.moe import balance
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import parallel
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from sparsejax.registry import ROUTERS

Params = Mapping[str, jax.Array]
EXPERT_WEIGHTS = ("wi_EDF", "wg_EDF", "wo_EFD")
SHARED_PREFIX = "shared_"  # shared experts' weights: "shared_wi_EDF", ...


class Routing(NamedTuple):
  """A router's decision for T tokens.

  plan: its plan, dropless (token choice) or with its own capacity (expert choice, BASE).
  logits_TE: the float32 logits it routed by; None for routers without any (hash tables).
  aux: the `ROUTERS` function's aux ("probs_TE", "entropy", optional "losses", extra
    metrics); {} without logits.
  """
  plan: plan_lib.DispatchPlan
  logits_TE: jax.Array | None
  aux: Mapping[str, Any]


# (params, x_TD, bias_E or None) -> Routing.
RouterFn = Callable[[Params, jax.Array, jax.Array | None], Routing]
# (params, x_TD, plan) -> (y_TD, pairs the expert-parallel exchange dropped, or None).
ExpertFn = Callable[[Params, jax.Array, plan_lib.DispatchPlan],
                    tuple[jax.Array, jax.Array | None]]


class LossWeights(NamedTuple):
  """Weights of the returned losses; 0 leaves a loss out. `router`: each loss the router
  returns in its aux["losses"] (MoEC's "cluster_variance")."""
  load_balance: float = 0.0
  importance: float = 0.0
  router_z: float = 0.0
  router: float = 0.0


def check_router_settings(router: str, k: int, num_experts: int, jitter: float,
                          bias_update_rate: float) -> None:
  """ValueError naming the setting unless `route_logits` can route with these."""
  if ROUTERS.get(router) is routing.route_hash:
    raise ValueError("router 'hash' routes token ids, which MoE does not receive; use the "
                     "FFN 'hash_moe' (sparsejax.moe.hash_layer) instead")
  routing.check_k(k, num_experts)
  if not 0 <= jitter < 1:
    raise ValueError(f"jitter must be in [0, 1), got {jitter}")
  if bias_update_rate < 0 or (bias_update_rate > 0 and router != "top_k"):
    raise ValueError(f"bias_update_rate must be >= 0 and needs router 'top_k', got "
                     f"{bias_update_rate} with router {router!r}")


def check_capacity_settings(capacity_factor: float | None, priority: str) -> None:
  """ValueError unless capacity_factor is None or > 0 and priority is known."""
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be None or > 0, got {capacity_factor}")
  if priority not in plan_lib.PRIORITIES:
    raise ValueError(f"priority must be one of {plan_lib.PRIORITIES}, got {priority!r}")


def check_expert_parallel_settings(expert_parallel: bool | str, ep_buffer_factor: float | None,
                                   ep_num_chunks: int, ep_exchange: str) -> None:
  """ValueError naming the setting unless `ffn_experts` accepts these."""
  if not (expert_parallel is True or expert_parallel is False or expert_parallel == "auto"):
    raise ValueError(f"expert_parallel must be 'auto', True or False, got {expert_parallel!r}")
  if ep_buffer_factor is not None and not ep_buffer_factor > 0:
    raise ValueError(f"ep_buffer_factor must be None or > 0, got {ep_buffer_factor}")
  if isinstance(ep_num_chunks, bool) or not isinstance(ep_num_chunks, int) or ep_num_chunks < 1:
    raise ValueError(f"ep_num_chunks must be an int >= 1, got {ep_num_chunks!r}")
  if ep_exchange not in parallel.EXCHANGES:
    raise ValueError(f"ep_exchange must be one of {parallel.EXCHANGES}, got {ep_exchange!r}")


def router_needs_rng(router: str, jitter: float) -> bool:
  """Whether `route_logits` needs an `rng` when not deterministic (jitter, or a router that
  draws, e.g. MoEC's expert dropout)."""
  return jitter > 0 or "rng" in inspect.signature(ROUTERS.get(router)).parameters


def route_logits(params: Params, x_TD: jax.Array, bias_E: jax.Array | None = None, *,
                 router: str, k: int, router_kwargs: Mapping[str, Any] | None = None,
                 jitter: float = 0.0, deterministic: bool = True,
                 rng: jax.Array | None = None) -> Routing:
  """Routes tokens by float32 logits with the `ROUTERS` function `router`.

  logits = x' W_r with W_r = params["router_DE"], or for a router in `routing.EXPERT_LOGITS`
  ("avg_k") read off params["wi_EDF"]; x' = x in float32, times U[1 - jitter, 1 + jitter]
  noise when not deterministic (Switch Transformer, Fedus et al., 2021). The router gets k,
  `router_kwargs`, `bias_E` when given (aux-loss-free balancing), and `deterministic` and a
  key split from `rng` when its signature has them. `rng` is needed when not deterministic and
  `router_needs_rng`.
  """
  x_TD = x_TD.astype(jnp.float32)
  route_fn = ROUTERS.get(router)
  if not deterministic and router_needs_rng(router, jitter):
    if rng is None:
      raise ValueError(f"router {router!r} with jitter={jitter} needs rng when not "
                       f"deterministic")
    jitter_rng, rng = jax.random.split(rng)
    if jitter > 0:
      x_TD = routing.apply_jitter(x_TD, jitter_rng, jitter)
  if router in routing.EXPERT_LOGITS:
    logits_TE = routing.EXPERT_LOGITS[router](x_TD, params["wi_EDF"])
  else:
    logits_TE = x_TD @ params["router_DE"].astype(jnp.float32)
  kwargs = dict(router_kwargs or {})
  accepted = inspect.signature(route_fn).parameters
  if "deterministic" in accepted:
    kwargs["deterministic"] = deterministic
  if "rng" in accepted and not deterministic:
    kwargs["rng"] = rng
  if bias_E is not None:
    kwargs["bias_E"] = bias_E
  plan, aux = route_fn(logits_TE, k=k, **kwargs)
  return Routing(plan, logits_TE, aux)


def limit_capacity(routed: Routing, capacity_factor: float | None, capacity_multiple: int = 1,
                   priority: str = "position") -> plan_lib.DispatchPlan:
  """The routed plan with expert buffers of C = ceil(T k cf / E), rounded up to a multiple.

  Unchanged when dropless (capacity_factor None) or when the router set its own capacity
  (expert choice, BASE). Pairs past an expert's C slots are dropped in `priority` order
  (GShard, Lepikhin et al., 2020): "position", earlier tokens first; "score", Batch Priority
  Routing (Riquelme et al., 2021, V-MoE): tokens by descending top-1 router probability
  max_e p_te, taken before any renormalisation or top-k softmax of the gates, one rank for
  all of a token's choices.
  """
  plan = routed.plan
  if plan.capacity is not None or capacity_factor is None:
    return plan
  capacity = plan_lib.compute_capacity(plan.num_tokens, plan.k, plan.num_experts,
                                       capacity_factor, capacity_multiple)
  score_T = None
  if priority == "score":
    if "probs_TE" not in routed.aux:
      raise ValueError("priority 'score' ranks tokens by router probabilities, which this "
                       "router does not return; use priority 'position'")
    score_T = jnp.max(routed.aux["probs_TE"], axis=-1)
  return plan_lib.apply_capacity(plan, capacity, priority, score_T)


def ffn_experts(params: Params, x_TD: jax.Array, plan: plan_lib.DispatchPlan, *, kind: str,
                implementation: str = "auto", tile: int = 128,
                expert_parallel: bool | str = False, pairs_per_token: float = 1,
                ep_buffer_factor: float | None = None, ep_num_chunks: int = 1,
                ep_exchange: str = "all_to_all") -> tuple[jax.Array, jax.Array | None]:
  """y_t = sum_k g_tk FFN_{e_tk}(x_t) (+ the shared experts' FFN(x_t)), in the weights' dtype.

  params: the stacked experts {"wi_EDF", "wo_EFD"(, "wg_EDF")} of kind "ffn" or "swiglu",
  and, if any, the shared experts fused into one {"shared_wi_EDF", ...} with E = 1. On one
  device the routed experts run on the plan's expert rows: a grouped matmul (`kernels.gmm`
  with `implementation`, row tile `tile`) for dropless plans, a batched einsum on the
  `[E, C, D]` buffers otherwise. On the mesh `parallel.select_mesh(expert_parallel, E)` picks
  they run in `parallel.expert_parallel_experts` (pairs_per_token, ep_buffer_factor,
  ep_num_chunks and ep_exchange are its buffer_factor, num_chunks and exchange).

  Returns:
    (y_TD, pairs dropped by the exchange buffers when ep_buffer_factor is set, else None).
  """
  weights = {name: params[name] for name in EXPERT_WEIGHTS if name in params}
  x_TD = x_TD.astype(weights["wi_EDF"].dtype)
  mesh = parallel.select_mesh(expert_parallel, plan.num_experts)
  dropped = None
  if mesh is None:
    y_TD = _local_experts(weights, x_TD, plan, kind, implementation, tile)
  else:
    y_TD, exchange_dropped = parallel.expert_parallel_experts(
        x_TD, plan, weights, kind, pairs_per_token=pairs_per_token,
        buffer_factor=ep_buffer_factor, num_chunks=ep_num_chunks, exchange=ep_exchange,
        implementation=implementation, tile=tile, mesh=mesh)
    if ep_buffer_factor is not None:
      dropped = exchange_dropped
  shared = {name: params[SHARED_PREFIX + name] for name in EXPERT_WEIGHTS
            if SHARED_PREFIX + name in params}
  if shared:
    y_TD = y_TD + experts.experts_batched(x_TD[None], shared, kind)[0]
  return y_TD, dropped


def _local_experts(weights: Params, x_TD: jax.Array, plan: plan_lib.DispatchPlan, kind: str,
                   implementation: str, tile: int) -> jax.Array:
  """dispatch -> experts on the plan's expert rows -> combine, on one device (or GSPMD)."""
  x_RD = dispatch.dispatch(x_TD, plan)
  if plan.capacity is None:
    y_RD = experts.experts_grouped(x_RD, weights, plan_lib.group_sizes(plan), kind,
                                   implementation=implementation, tile=tile)
  else:
    x_ECD = x_RD.reshape(plan.num_experts, plan.capacity, x_RD.shape[-1])
    y_RD = experts.experts_batched(x_ECD, weights, kind).reshape(x_RD.shape)
  return dispatch.combine(y_RD, plan)


def moe_aux(routed: Routing, plan: plan_lib.DispatchPlan, exchange_dropped: jax.Array | None,
            loss_weights: LossWeights) -> Aux:
  """Losses and metrics of one call; `exchange_dropped` pairs count as dropped.

  Metrics: "expert_load_E" (f_e of the routed plan, before capacity), "load_max_over_mean",
  "dropped_fraction" (of routed pairs), "exchange_dropped_fraction" (only with a count); with
  logits also "router_entropy", "z_loss" and the router's extra metrics. Losses (with logits,
  weight > 0): the router's own, "load_balance" (Switch), "importance" (Shazeer et al.,
  2017), "router_z" (ST-MoE), each times its weight.
  """
  fraction_E = balance.expert_fraction(routed.plan)
  routed_pairs = jnp.sum(routed.plan.keep_TK)
  dropped_pairs = routed_pairs - jnp.sum(plan.keep_TK)
  if exchange_dropped is not None:
    dropped_pairs = dropped_pairs + exchange_dropped
  metrics = {
      "expert_load_E": fraction_E,
      "load_max_over_mean": jnp.max(fraction_E) * plan.num_experts,
      "dropped_fraction": dropped_pairs / jnp.maximum(routed_pairs, 1),
  }
  if exchange_dropped is not None:
    metrics["exchange_dropped_fraction"] = exchange_dropped / jnp.maximum(routed_pairs, 1)
  if routed.logits_TE is None:
    return {"losses": {}, "metrics": metrics}
  router_aux = routed.aux
  z_loss = balance.router_z_loss(routed.logits_TE)
  metrics["router_entropy"] = router_aux["entropy"]
  metrics["z_loss"] = z_loss
  metrics.update({name: value for name, value in router_aux.items()
                  if name not in ("probs_TE", "entropy", "losses")})
  losses = {}
  if loss_weights.router:
    losses.update({name: loss_weights.router * value
                   for name, value in router_aux.get("losses", {}).items()})
  if loss_weights.load_balance:
    losses["load_balance"] = loss_weights.load_balance * balance.load_balance_loss(
        router_aux["probs_TE"], fraction_E)
  if loss_weights.importance:
    losses["importance"] = loss_weights.importance * balance.importance_loss(routed.plan)
  if loss_weights.router_z:
    losses["router_z"] = loss_weights.router_z * z_loss
  return {"losses": losses, "metrics": metrics}


def moe_apply(params: Params, x_TD: jax.Array, *, router_fn: RouterFn, expert_fn: ExpertFn,
              capacity_factor: float | None = None, capacity_multiple: int = 1,
              priority: str = "position", loss_weights: LossWeights = LossWeights(),
              bias_E: jax.Array | None = None, bias_update_rate: float = 0.0
              ) -> tuple[jax.Array, Aux, jax.Array | None]:
  """The MoE FFN on tokens x_TD: y_t = sum_k g_tk Expert_{e_tk}(x_t) over the kept pairs.

  Routes with `router_fn`, limits capacity (`limit_capacity`), runs `expert_fn` and assembles
  aux (`moe_aux`). `bias_E`: the selection bias of aux-loss-free balancing (Wang et al.,
  2024), state passed in and returned: b' = `balance.update_bias`(b, routed load,
  bias_update_rate).

  Returns:
    (y_TD, {"losses", "metrics"}, b' or None when bias_E is None).
  """
  routed = router_fn(params, x_TD, bias_E)
  plan = limit_capacity(routed, capacity_factor, capacity_multiple, priority)
  y_TD, exchange_dropped = expert_fn(params, x_TD, plan)
  aux = moe_aux(routed, plan, exchange_dropped, loss_weights)
  if bias_E is not None:
    bias_E = balance.update_bias(bias_E, plan_lib.group_sizes(routed.plan), bias_update_rate)
  return y_TD, aux, bias_E
