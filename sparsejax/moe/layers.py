"""The sparse mixture-of-experts FFN as a thin Flax Linen module over the pure MoE core."""
import dataclasses
import inspect
from typing import Any, ClassVar, Iterable, Mapping

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.moe import balance
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import parallel
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from sparsejax.moe import soft
from sparsejax.registry import FFNS
from sparsejax.registry import ROUTERS

_EXPERT_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
_ROUTER_INIT = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")

# The `MoE` fields of its expert-parallel path (`sparsejax.moe.parallel`).
EP_FIELDS = ("expert_parallel", "ep_buffer_factor", "ep_num_chunks", "ep_exchange")


def fields_off_default(module: nn.Module, names: Iterable[str]) -> dict[str, Any]:
  """{name: value} of those dataclass fields `names` of `module` not at their declared default.

  For a layer built on `MoE` that ignores some of its fields and must reject them when set.
  """
  defaults = {field.name: field.default for field in dataclasses.fields(type(module))}
  return {name: getattr(module, name) for name in names if getattr(module, name) != defaults[name]}


def expert_params(module: nn.Module, prefix: str, num: int, hidden: int,
                  expert_axis: str | None) -> dict[str, jax.Array]:
  """`num` stacked FFN weights {"wi_EDF", "wo_EFD"(, "wg_EDF")} of `module`, in its dtype.

  `module` provides d_model, expert ("ffn" | "swiglu"), dtype and param_dtype; weights carry
  the logical axes (expert_axis, "embed", "mlp") and (expert_axis, "mlp", "embed").
  """
  w_in = ((num, module.d_model, hidden), (expert_axis, "embed", "mlp"))
  w_out = ((num, hidden, module.d_model), (expert_axis, "mlp", "embed"))
  specs = {"wi_EDF": w_in, "wo_EFD": w_out}
  if module.expert == "swiglu":
    specs["wg_EDF"] = w_in
  return {
      name: module.param(prefix + name, nn.with_logical_partitioning(_EXPERT_INIT, axes), shape,
                         module.param_dtype).astype(module.dtype)
      for name, (shape, axes) in specs.items()
  }


@FFNS.register("moe")
class MoE(nn.Module):
  """Token-routed experts: y_t = sum_k g_tk FFN_{e_tk}(x_t) (+ shared experts' FFN(x_t)).

  Router logits x W_r are computed in float32 (Switch Transformer, Fedus et al., 2021); the
  router named by `router` (see `ROUTERS`) builds a dispatch plan; `capacity_factor` None runs
  the experts dropless on expert-sorted rows with a grouped matmul (MegaBlocks, Gale et al.,
  2023), otherwise on `[E, C, D]` buffers with C = ceil(T k cf / E) and token dropping by
  `priority` (GShard, Lepikhin et al., 2020). Expert-choice plans always use their own
  capacity. All B * T tokens of a call form one routing group.

  Attributes:
    d_model: D. d_ff: F, hidden size of each expert (and of each shared expert).
    num_experts: E. k: experts per token (the cap for "threshold", the average for
      "expert_choice").
    router: a `ROUTERS` name taking logits: "top_k", "expert_choice", "threshold",
      "balanced" (BASE, k=1), "prototype", "moec", or "avg_k" (logits from the experts'
      first-layer weights, see `routing.EXPERT_LOGITS`; no router params). Routers whose
      signature has `deterministic` get it; those with `rng` get one from the "dropout" stream
      when not deterministic.
    router_kwargs: extra keyword arguments of the router, e.g. {"order": ..., "renormalize":
      True} for top_k, {"p": 0.5} for threshold, {"capacity_factor": 1.0} for expert_choice,
      {"cluster_size": 4, "expert_dropout": 0.5} for moec.
    capacity_factor: None for dropless, else > 0. capacity_multiple: round C up to this.
    priority: who keeps a slot when an expert overflows: "position" or "score".
    expert: "ffn" (GELU) or "swiglu". num_shared_experts: always-on experts (DeepSeekMoE).
    load_balance_weight, importance_weight, z_loss_weight: weights of the returned losses.
    router_loss_weight: weight of each loss the router returns in its aux["losses"] (MoEC's
      "cluster_variance").
    jitter: router-input noise eps when not deterministic; draws from the "dropout" rng.
    bias_update_rate: > 0 turns on aux-loss-free balancing for "top_k": a selection bias in
      the "moe_bias" collection, updated when that collection is mutable and not deterministic.
    implementation: backend of the dropless grouped matmul `kernels.gmm.gmm`: "auto", "pallas",
      "xla" or "reference". tile: its row tile tm (the kernel's default is 128).
    expert_parallel: "auto" (the default) runs the experts with `sparsejax.moe.parallel` (in
      a `shard_map`, each device on its own tokens; with an "expert" axis > 1 the tokens go by
      all_to_all to the devices holding their experts) whenever the mesh set with
      `jax.set_mesh` splits the tokens (data x fsdp x expert > 1), and as plain array code
      otherwise (one device, or a "model"-only mesh). GSPMD partitions that plain code poorly
      under data parallelism (`python -m experiments.bench ep`: 6-11x slower on 8 CPU
      devices), hence the default. True always takes the `shard_map` path (a mesh must be set); False never.
      Routing is always global (the same plan as on one device), so the output is the
      single-device layer's unless the exchange buffer drops pairs (`ep_buffer_factor`).
      num_experts must be divisible by the mesh's expert axis.
    ep_buffer_factor: None sizes the exchange buffers for the worst case (never drops); f > 0
      sizes them for f times a balanced load, dropping the overflow deterministically (counted
      in "dropped_fraction"; "exchange_dropped_fraction" reports it alone).
    ep_num_chunks: token chunks per device exchanged one after another, so that communication
      of one chunk can overlap the expert compute of another (same result).
    ep_exchange: "all_to_all" (every platform) or "ragged" (`jax.lax.ragged_all_to_all`, TPU
      and GPU only; a ValueError on CPU).
    dtype / param_dtype: compute / parameter dtype.

  Call with `router_DE` to route by a router weight owned elsewhere (Omni-Router's weight
  shared by all MoE layers, Gu et al., 2025; see `TransformerLM(shared_router=True)`).
  """
  shares_router: ClassVar[bool] = True
  d_model: int
  d_ff: int
  num_experts: int = 8
  k: int = 2
  router: str = "top_k"
  router_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
  capacity_factor: float | None = None
  capacity_multiple: int = 1
  priority: str = "position"
  expert: str = "swiglu"
  num_shared_experts: int = 0
  load_balance_weight: float = 1e-2
  importance_weight: float = 0.0
  z_loss_weight: float = 1e-3
  router_loss_weight: float = 1e-2
  jitter: float = 0.0
  bias_update_rate: float = 0.0
  implementation: str = "auto"
  tile: int = 128
  expert_parallel: bool | str = "auto"
  ep_buffer_factor: float | None = None
  ep_num_chunks: int = 1
  ep_exchange: str = "all_to_all"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool = True,
               router_DE: jax.Array | None = None):
    """Returns (y_BTD, {"losses": {name: weighted scalar}, "metrics": {name: array}}).

    `router_DE`: a `[D, E]` router weight to use instead of this layer's own "router_DE" param.
    """
    self._validate()
    batch, length, d_model = x_BTD.shape
    x_TD = x_BTD.reshape(batch * length, d_model)
    if self.router in routing.EXPERT_LOGITS:
      weights = expert_params(self, "", self.num_experts, self.d_ff, "expert")
      logits_TE = self._expert_logits(x_TD, weights["wi_EDF"], deterministic, router_DE)
    else:
      weights = None
      logits_TE = self._router_logits(x_TD, deterministic, router_DE)
    routed, router_aux = self._route(logits_TE, deterministic)
    plan = self._limit_capacity(routed)
    y_TD, exchange_dropped = self._experts_and_drops(x_TD.astype(self.dtype), plan, weights)
    if self.num_shared_experts:
      y_TD = y_TD + self._shared_experts(x_TD.astype(self.dtype))
    aux = self._aux(logits_TE, routed, plan, router_aux, exchange_dropped)
    return y_TD.reshape(batch, length, d_model), aux

  def _validate(self) -> None:
    route_fn = ROUTERS.get(self.router)
    if route_fn is routing.route_hash:
      raise ValueError("router 'hash' routes token ids, which MoE does not receive; use the "
                       "FFN 'hash_moe' (sparsejax.moe.hash_layer) instead")
    experts.check_expert_kind(self.expert)
    routing.check_k(self.k, self.num_experts)
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(f"capacity_factor must be None or > 0, got {self.capacity_factor}")
    if self.priority not in plan_lib.PRIORITIES:
      raise ValueError(f"priority must be one of {plan_lib.PRIORITIES}, got {self.priority!r}")
    if not 0 <= self.jitter < 1:
      raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
    if self.bias_update_rate < 0 or (self.bias_update_rate > 0 and self.router != "top_k"):
      raise ValueError(f"bias_update_rate must be >= 0 and needs router 'top_k', got "
                       f"{self.bias_update_rate} with router {self.router!r}")
    self._validate_expert_parallel()

  def _validate_expert_parallel(self) -> None:
    if not (self.expert_parallel is True or self.expert_parallel is False
            or self.expert_parallel == "auto"):
      raise ValueError(f"expert_parallel must be 'auto', True or False, got "
                       f"{self.expert_parallel!r}")
    if self.ep_buffer_factor is not None and not self.ep_buffer_factor > 0:
      raise ValueError(f"ep_buffer_factor must be None or > 0, got {self.ep_buffer_factor}")
    chunks = self.ep_num_chunks
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
      raise ValueError(f"ep_num_chunks must be an int >= 1, got {chunks!r}")
    if self.ep_exchange not in parallel.EXCHANGES:
      raise ValueError(f"ep_exchange must be one of {parallel.EXCHANGES}, got "
                       f"{self.ep_exchange!r}")

  def _expert_parallel_mesh(self):
    """The mesh to run the experts expert-parallel on, or None for the GSPMD path."""
    mesh = parallel.current_mesh()
    parallel.check_num_experts(self.num_experts, mesh)
    if self.expert_parallel is False:
      return None
    if self.expert_parallel is True:
      if mesh is None:
        raise ValueError("expert_parallel=True needs a device mesh: call the layer inside "
                         "`with jax.set_mesh(mesh):` (see sparsejax.sharding.make_mesh)")
      return mesh
    return mesh if parallel.token_shards(mesh) > 1 else None

  def router_param(self, owner: nn.Module, name: str) -> jax.Array:
    """The router weight W_r `[D, E]` as param `name` of `owner` (this layer, or a model)."""
    return owner.param(name, nn.with_logical_partitioning(_ROUTER_INIT, ("embed", None)),
                       (self.d_model, self.num_experts), self.param_dtype)

  def _router_logits(self, x_TD: jax.Array, deterministic: bool,
                     router_DE: jax.Array | None) -> jax.Array:
    """float32 logits x W_r, with multiplicative jitter on x when training."""
    if router_DE is None:
      w_DE = self.router_param(self, "router_DE")
    elif router_DE.shape != (self.d_model, self.num_experts):
      raise ValueError(f"router_DE must have shape (d_model, num_experts) = "
                       f"{(self.d_model, self.num_experts)}, got {router_DE.shape}")
    else:
      w_DE = router_DE
    return self._router_input(x_TD, deterministic) @ w_DE.astype(jnp.float32)

  def _expert_logits(self, x_TD: jax.Array, wi_EDF: jax.Array, deterministic: bool,
                     router_DE: jax.Array | None) -> jax.Array:
    """float32 logits of a router in `routing.EXPERT_LOGITS`, read off the expert weights."""
    if router_DE is not None:
      raise ValueError(f"router {self.router!r} routes by the expert weights and takes no "
                       f"router_DE")
    return routing.EXPERT_LOGITS[self.router](self._router_input(x_TD, deterministic), wi_EDF)

  def _router_input(self, x_TD: jax.Array, deterministic: bool) -> jax.Array:
    """x in float32, with multiplicative jitter when training."""
    x_TD = x_TD.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      x_TD = routing.apply_jitter(x_TD, self.make_rng("dropout"), self.jitter)
    return x_TD

  def _route(self, logits_TE: jax.Array, deterministic: bool):
    """The router's dropless (or expert-choice) plan, updating the aux-free bias if on."""
    route_fn = ROUTERS.get(self.router)
    kwargs = dict(self.router_kwargs)
    kwargs.update(self._mode_kwargs(route_fn, deterministic))
    if self.bias_update_rate == 0:
      return route_fn(logits_TE, k=self.k, **kwargs)
    bias = self.variable("moe_bias", "bias_E", jnp.zeros, (self.num_experts,), jnp.float32)
    routed, router_aux = route_fn(logits_TE, k=self.k, bias_E=bias.value, **kwargs)
    if not deterministic and self.is_mutable_collection("moe_bias"):
      bias.value = balance.update_bias(bias.value, plan_lib.group_sizes(routed),
                                       self.bias_update_rate)
    return routed, router_aux

  def _mode_kwargs(self, route_fn, deterministic: bool) -> dict[str, Any]:
    """`deterministic`, and when training a "dropout"-stream `rng`, if `route_fn` takes them."""
    accepted = inspect.signature(route_fn).parameters
    kwargs = {}
    if "deterministic" in accepted:
      kwargs["deterministic"] = deterministic
    if "rng" in accepted and not deterministic:
      kwargs["rng"] = self.make_rng("dropout")
    return kwargs

  def _limit_capacity(self, routed: plan_lib.DispatchPlan) -> plan_lib.DispatchPlan:
    if routed.capacity is not None or self.capacity_factor is None:
      return routed
    capacity = plan_lib.compute_capacity(routed.num_tokens, routed.k, self.num_experts,
                                         self.capacity_factor, self.capacity_multiple)
    return plan_lib.apply_capacity(routed, capacity, self.priority)

  def _run_experts(self, x_TD: jax.Array, plan: plan_lib.DispatchPlan,
                   weights: dict[str, jax.Array] | None = None) -> jax.Array:
    """The routed experts' combined output; `weights` if the router already created them."""
    return self._experts_and_drops(x_TD, plan, weights)[0]

  def _experts_and_drops(self, x_TD: jax.Array, plan: plan_lib.DispatchPlan,
                         weights: dict[str, jax.Array] | None = None):
    """(combined output, pairs the expert-parallel exchange dropped or None if it cannot)."""
    if weights is None:
      weights = expert_params(self, "", self.num_experts, self.d_ff, "expert")
    mesh = self._expert_parallel_mesh()
    if mesh is not None:
      y_TD, dropped = parallel.expert_parallel_experts(
          x_TD, plan, weights, self.expert, pairs_per_token=self.k,
          buffer_factor=self.ep_buffer_factor, num_chunks=self.ep_num_chunks,
          exchange=self.ep_exchange, implementation=self.implementation, tile=self.tile,
          mesh=mesh)
      return y_TD, (dropped if self.ep_buffer_factor is not None else None)
    x_RD = dispatch.dispatch(x_TD, plan)
    if plan.capacity is None:
      y_RD = experts.experts_grouped(x_RD, weights, plan_lib.group_sizes(plan), self.expert,
                                     implementation=self.implementation, tile=self.tile)
    else:
      x_ECD = x_RD.reshape(self.num_experts, plan.capacity, self.d_model)
      y_RD = experts.experts_batched(x_ECD, weights, self.expert).reshape(x_RD.shape)
    return dispatch.combine(y_RD, plan), None

  def _shared_experts(self, x_TD: jax.Array) -> jax.Array:
    """num_shared_experts always-on FFNs, fused into one of hidden num_shared * F."""
    weights = expert_params(self, "shared_", 1, self.num_shared_experts * self.d_ff, None)
    return experts.experts_batched(x_TD[None], weights, self.expert)[0]

  def _aux(self, logits_TE, routed, plan, router_aux,
           exchange_dropped=None) -> dict[str, dict[str, jax.Array]]:
    """Losses and metrics; `exchange_dropped` pairs (EP buffer overflow) count as dropped."""
    fraction_E = balance.expert_fraction(routed)
    z_loss = balance.router_z_loss(logits_TE)
    routed_pairs = jnp.sum(routed.keep_TK)
    dropped_pairs = routed_pairs - jnp.sum(plan.keep_TK)
    if exchange_dropped is not None:
      dropped_pairs = dropped_pairs + exchange_dropped
    metrics = {
        "expert_load_E": fraction_E,
        "load_max_over_mean": jnp.max(fraction_E) * self.num_experts,
        "dropped_fraction": dropped_pairs / jnp.maximum(routed_pairs, 1),
        "router_entropy": router_aux["entropy"],
        "z_loss": z_loss,
    }
    if exchange_dropped is not None:
      metrics["exchange_dropped_fraction"] = exchange_dropped / jnp.maximum(routed_pairs, 1)
    metrics.update({name: value for name, value in router_aux.items()
                    if name not in ("probs_TE", "entropy", "losses")})
    losses = {}
    if self.router_loss_weight:
      losses.update({name: self.router_loss_weight * value
                     for name, value in router_aux.get("losses", {}).items()})
    if self.load_balance_weight:
      losses["load_balance"] = self.load_balance_weight * balance.load_balance_loss(
          router_aux["probs_TE"], fraction_E)
    if self.importance_weight:
      losses["importance"] = self.importance_weight * balance.importance_loss(routed)
    if self.z_loss_weight:
      losses["router_z"] = self.z_loss_weight * z_loss
    return {"losses": losses, "metrics": metrics}


@FFNS.register("soft_moe")
class SoftMoE(nn.Module):
  """Soft MoE: experts run on slots, each a softmax mix of a token group; tokens mix slots.

  Per group of M tokens: slots = softmax_M(logits)^T x, expert e runs on its slots_per_expert
  slots, y = softmax_S(logits) expert_out, with logits = scale * norm(x) norm(phi) (see
  `soft.py`; Puigcerver et al., 2024). There is no dropping and no balancing loss.

  A slot mixes every token of its group, so a group of M > 1 tokens lets a token see later
  ones: with `causal` (the default, as in a decoder LM) the layer requires
  token_group_size=1 (each token its own group; exact but E * slots_per_expert expert calls per
  token). Set causal=False for encoders and ViTs.

  Attributes:
    d_model: D. d_ff: F of each expert. num_experts: E. slots_per_expert: p.
    expert: "ffn" or "swiglu". causal: see above.
    token_group_size: tokens per group along the sequence; None for the whole sequence.
    dtype / param_dtype: compute / parameter dtype.
  """
  d_model: int
  d_ff: int
  num_experts: int = 8
  slots_per_expert: int = 1
  expert: str = "swiglu"
  causal: bool = True
  token_group_size: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool = True):
    """Returns (y_BTD, {"losses": {}, "metrics": {"dispatch_entropy", "combine_entropy"}})."""
    del deterministic  # Soft MoE has no training-only behaviour.
    batch, length, d_model = x_BTD.shape
    group = self._group_size(length)
    num_slots = self.num_experts * self.slots_per_expert
    phi_DS = self.param("phi_DS", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "slot")), (d_model, num_slots),
        self.param_dtype)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ()), (),
                       self.param_dtype)
    x_GMD = x_BTD.reshape(batch * length // group, group, d_model).astype(self.dtype)
    dispatch_GMS, combine_GMS = soft.soft_weights(x_GMD, phi_DS, scale)
    slots_GSD = soft.soft_dispatch(x_GMD, dispatch_GMS)
    out_GSD = self._run_experts(slots_GSD)
    y_BTD = soft.soft_combine(out_GSD, combine_GMS).reshape(batch, length, d_model)
    metrics = {
        "dispatch_entropy": routing.router_entropy(jnp.swapaxes(dispatch_GMS, 1, 2)),
        "combine_entropy": routing.router_entropy(combine_GMS),
    }
    return y_BTD, {"losses": {}, "metrics": metrics}

  def _group_size(self, length: int) -> int:
    """Tokens per group, after checking the configuration."""
    experts.check_expert_kind(self.expert)
    if self.num_experts < 1 or self.slots_per_expert < 1:
      raise ValueError(f"num_experts and slots_per_expert must be >= 1, got "
                       f"{self.num_experts} and {self.slots_per_expert}")
    if self.causal and self.token_group_size != 1:
      raise ValueError(f"SoftMoE with causal=True needs token_group_size=1 (a slot mixes all "
                       f"tokens of its group, so larger groups see future tokens), got "
                       f"token_group_size={self.token_group_size}; set causal=False for "
                       f"non-causal models")
    group = length if self.token_group_size is None else self.token_group_size
    if group < 1 or length % group:
      raise ValueError(f"token_group_size must be >= 1 and divide the length {length}, got "
                       f"{self.token_group_size}")
    return group

  def _run_experts(self, slots_GSD: jax.Array) -> jax.Array:
    """Expert e on slots [e * p, (e + 1) * p) of every group."""
    num_groups, _, d_model = slots_GSD.shape
    x_EGPD = slots_GSD.reshape(num_groups, self.num_experts, self.slots_per_expert,
                               d_model).transpose(1, 0, 2, 3)
    weights = expert_params(self, "", self.num_experts, self.d_ff, "expert")
    out_ECD = experts.experts_batched(x_EGPD.reshape(self.num_experts, -1, d_model), weights,
                                      self.expert)
    return out_ECD.reshape(x_EGPD.shape).transpose(1, 0, 2, 3).reshape(slots_GSD.shape)
