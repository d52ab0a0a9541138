"""The MoE and Soft MoE FFNs as thin Flax Linen modules over the pure core.

A token-routed layer owns its params (and the aux-loss-free bias state), builds a router and an
expert function from its fields and calls `core.moe_apply`; the helpers below are the pieces
"moe", "conv_moe", "hash_moe" and "lora_moe" share. Settings are checked when a layer is
constructed; what depends on the input or the mesh, when it is traced.
"""
import functools
from typing import Any, ClassVar, Mapping

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.moe import core
from sparsejax.moe import experts
from sparsejax.moe import routing
from sparsejax.moe import soft
from sparsejax.registry import FFNS

_EXPERT_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
_ROUTER_INIT = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
BIAS_COLLECTION = "moe_bias"  # the aux-loss-free selection bias "bias_E" lives here


def expert_params(module: nn.Module, prefix: str, num: int, hidden: int,
                  expert_axis: str | None) -> dict[str, jax.Array]:
  """`num` stacked FFN weights {prefix + "wi_EDF", prefix + "wo_EFD"(, prefix + "wg_EDF")}.

  `module` provides d_model, expert ("ffn" | "swiglu"), dtype and param_dtype; the weights are
  its params of those names, in its dtype, with the logical axes (expert_axis, "embed", "mlp")
  and (expert_axis, "mlp", "embed").
  """
  w_in = ((num, module.d_model, hidden), (expert_axis, "embed", "mlp"))
  w_out = ((num, hidden, module.d_model), (expert_axis, "mlp", "embed"))
  specs = {"wi_EDF": w_in, "wo_EFD": w_out}
  if module.expert == "swiglu":
    specs["wg_EDF"] = w_in
  return {
      prefix + name: module.param(prefix + name, nn.with_logical_partitioning(_EXPERT_INIT, axes),
                                  shape, module.param_dtype).astype(module.dtype)
      for name, (shape, axes) in specs.items()
  }


def ffn_params(module: nn.Module) -> dict[str, jax.Array]:
  """The params `core.ffn_experts` reads: num_experts experts of hidden d_ff, and the
  num_shared_experts shared experts fused into one of hidden num_shared_experts * d_ff."""
  params = expert_params(module, "", module.num_experts, module.d_ff, "expert")
  if module.num_shared_experts:
    params |= expert_params(module, core.SHARED_PREFIX, 1,
                            module.num_shared_experts * module.d_ff, None)
  return params


def ffn_expert_fn(module: nn.Module, pairs_per_token: float) -> core.ExpertFn:
  """`core.ffn_experts` with `module`'s expert, implementation, tile and expert-parallel
  (expert_parallel, ep_*) fields; pairs_per_token sizes factor-f exchange buffers."""
  return functools.partial(
      core.ffn_experts, kind=module.expert, implementation=module.implementation,
      tile=module.tile, expert_parallel=module.expert_parallel, pairs_per_token=pairs_per_token,
      ep_buffer_factor=module.ep_buffer_factor, ep_num_chunks=module.ep_num_chunks,
      ep_exchange=module.ep_exchange)


def router_weight(owner: nn.Module, name: str, d_model: int, num_experts: int,
                  param_dtype: Any) -> jax.Array:
  """A router weight W_r `[D, E]`, param `name` of `owner`, axes ("embed", None)."""
  return owner.param(name, nn.with_logical_partitioning(_ROUTER_INIT, ("embed", None)),
                     (d_model, num_experts), param_dtype)


def router_params(module: nn.Module, router_DE: jax.Array | None) -> dict[str, jax.Array]:
  """{"router_DE": W_r} for `core.route_logits`: `router_DE` when a model shares one, else
  `module`'s own param; {} for routers reading the expert weights (`routing.EXPERT_LOGITS`)."""
  if module.router in routing.EXPERT_LOGITS:
    if router_DE is not None:
      raise ValueError(f"router {module.router!r} routes by the expert weights and takes no "
                       f"router_DE")
    return {}
  if router_DE is None:
    return {"router_DE": module.router_param(module, "router_DE")}
  if router_DE.shape != (module.d_model, module.num_experts):
    raise ValueError(f"router_DE must have shape (d_model, num_experts) = "
                     f"{(module.d_model, module.num_experts)}, got {router_DE.shape}")
  return {"router_DE": router_DE}


def apply_with_learned_router(module: nn.Module, params: Mapping[str, jax.Array],
                              x_TD: jax.Array, expert_fn: core.ExpertFn, *,
                              deterministic: bool) -> tuple[jax.Array, Aux]:
  """`core.moe_apply` with `core.route_logits`, configured by `module`'s fields.

  `module` has MoE's router (router, k, router_kwargs, jitter, bias_update_rate), capacity
  and loss-weight fields. Training (not `deterministic`) draws the router's key from the
  "dropout" stream when it needs one; with bias_update_rate > 0 the selection bias "bias_E"
  is state in `BIAS_COLLECTION`, updated when training and that collection is mutable.
  """
  rng = None
  if not deterministic and core.router_needs_rng(module.router, module.jitter):
    rng = module.make_rng("dropout")
  router_fn = functools.partial(
      core.route_logits, router=module.router, k=module.k,
      router_kwargs=module.router_kwargs, jitter=module.jitter,
      deterministic=deterministic, rng=rng)
  bias = None
  if module.bias_update_rate > 0:
    bias = module.variable(BIAS_COLLECTION, "bias_E", jnp.zeros, (module.num_experts,),
                           jnp.float32)
  loss_weights = core.LossWeights(
      load_balance=module.load_balance_weight, importance=module.importance_weight,
      router_z=module.z_loss_weight, router=module.router_loss_weight)
  y_TD, aux, bias_E = core.moe_apply(
      params, x_TD, router_fn=router_fn, expert_fn=expert_fn,
      capacity_factor=module.capacity_factor, capacity_multiple=module.capacity_multiple,
      priority=module.priority, loss_weights=loss_weights,
      bias_E=None if bias is None else bias.value, bias_update_rate=module.bias_update_rate)
  if bias is not None and not deterministic and module.is_mutable_collection(BIAS_COLLECTION):
    bias.value = bias_E
  return y_TD, aux


@FFNS.register("moe")
class MoE(nn.Module):
  """Token-routed experts: y_t = sum_k g_tk FFN_{e_tk}(x_t) (+ shared experts' FFN(x_t)).

  `core.moe_apply` with the router function `core.route_logits` and the expert function
  `core.ffn_experts`. Router logits x W_r are computed in float32 (Switch Transformer, Fedus et
  al., 2021); the router named by `router` (see `ROUTERS`) builds a dispatch plan;
  `capacity_factor` None runs the experts dropless on expert-sorted rows with a grouped matmul
  (MegaBlocks, Gale et al., 2023), otherwise on `[E, C, D]` buffers with C = ceil(T k cf / E)
  and token dropping by `priority` (GShard, Lepikhin et al., 2020). Expert-choice plans always
  use their own capacity. All B * T tokens of a call form one routing group.

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
    priority: who keeps a slot when an expert overflows: "position" (earlier tokens) or
      "score", Batch Priority Routing (Riquelme et al., 2021, V-MoE): tokens ranked by the
      router's top-1 probability max_e p_te before any renormalisation of the gates, for all
      their choices (`core.limit_capacity`).
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
      devices), hence the default. True always takes the `shard_map` path (a mesh must be
      set); False never.
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

  def __post_init__(self):
    core.check_router_settings(self.router, self.k, self.num_experts, self.jitter,
                               self.bias_update_rate)
    experts.check_expert_kind(self.expert)
    core.check_capacity_settings(self.capacity_factor, self.priority)
    core.check_expert_parallel_settings(self.expert_parallel, self.ep_buffer_factor,
                                        self.ep_num_chunks, self.ep_exchange)
    super().__post_init__()

  def router_param(self, owner: nn.Module, name: str) -> jax.Array:
    """The router weight W_r `[D, E]` as param `name` of `owner` (this layer, or a model)."""
    return router_weight(owner, name, self.d_model, self.num_experts, self.param_dtype)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True,
               router_DE: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Returns (y_BTD, {"losses": {name: weighted scalar}, "metrics": {name: array}}).

    `router_DE`: a `[D, E]` router weight to use instead of this layer's own "router_DE" param.
    """
    batch, length, d_model = x_BTD.shape
    y_TD, aux = self._tokens(x_BTD.reshape(batch * length, d_model),
                             deterministic=deterministic, router_DE=router_DE)
    return y_TD.reshape(x_BTD.shape), aux

  def _tokens(self, x_TD: jax.Array, *, deterministic: bool,
              router_DE: jax.Array | None) -> tuple[jax.Array, Aux]:
    """The layer on T tokens (one routing group)."""
    params = ffn_params(self) | router_params(self, router_DE)
    return apply_with_learned_router(self, params, x_TD, ffn_expert_fn(self, self.k),
                                     deterministic=deterministic)


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

  def __post_init__(self):
    experts.check_expert_kind(self.expert)
    if self.num_experts < 1 or self.slots_per_expert < 1:
      raise ValueError(f"num_experts and slots_per_expert must be >= 1, got "
                       f"{self.num_experts} and {self.slots_per_expert}")
    if self.causal and self.token_group_size != 1:
      raise ValueError(f"SoftMoE with causal=True needs token_group_size=1 (a slot mixes all "
                       f"tokens of its group, so larger groups see future tokens), got "
                       f"token_group_size={self.token_group_size}; set causal=False for "
                       f"non-causal models")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
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
    """Tokens per group, after checking that it divides the sequence length."""
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
