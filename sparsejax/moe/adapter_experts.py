"""Mixture of bottleneck-adapter experts over one shared FFN (PESC): the expert kind beside
lora_moe's LoRA experts.

Every expert is the shared FFN F followed by its own bottleneck adapter with a residual,
E_e(z) = z + gelu(z W^down_e) W^up_e on z = F(x) (W^down_e: D x R, W^up_e: R x D). A token
routed to experts e_t1..e_tK with gates g_tk gets

  y_t = F(x_t) + sum_k g_tk gelu(F(x_t) W^down_{e_tk}) W^up_{e_tk},

which is PESC's sum_k g_tk E_{e_tk}(x_t) whenever a token's gates sum to 1 (top-k with
renormalised gates or topk_then_softmax, as PESC's top-2 routing), and keeps F(x_t) whole for a
token whose choices were dropped by a capacity limit. W^up starts at 0, so a fresh layer is the
shared FFN. The shared FFN's params have DenseFFN's names ("wi", "wi_gate", "wo"), so
`lora_experts.load_dense_ffn` fills them from a dense model and
`lora_experts.make_adapter_optimizer` trains only adapters and routers (PESC's recipe).

The adapters run on the router's expert-sorted rows of z (`lora_experts.grouped_matmul`: the
grouped matmul `kernels.gmm` for dropless plans, a batched einsum on capacity buffers), then one
gate-weighted combine; an expert sees only its tokens.

Shape letters beyond the DESIGN legend: R the adapter's bottleneck width; M the rows of the
expert-sorted layout.

Wu et al., 2024, "Parameter-Efficient Sparsity Crafting from Dense to Mixture-of-Experts for
Instruction Tuning on General Tasks" (PESC); adapters: Houlsby et al., 2019, "Parameter-Efficient
Transfer Learning for NLP".
"""
import functools
from typing import Any, ClassVar, Mapping

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp

from kernels import gmm as gmm_lib
from sparsejax.auxiliary import Aux
from sparsejax.moe import core
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import plan as plan_lib
from sparsejax.moe.layers import apply_with_learned_router
from sparsejax.moe.layers import router_params
from sparsejax.moe.layers import router_weight
from sparsejax.moe.lora_experts import SHARED_WEIGHTS
from sparsejax.moe.lora_experts import check_routed_adapter_settings
from sparsejax.moe.lora_experts import grouped_matmul
from sparsejax.moe.lora_experts import shared_ffn_params
from sparsejax.registry import FFNS

DOWN, UP = "adapter_down", "adapter_up"  # `lora_experts.ADAPTER_SUFFIXES` names both
_DOWN_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


def shared_ffn(x_TD: jax.Array, shared: Mapping[str, jax.Array], kind: str) -> jax.Array:
  """F(x) = act(x W_i [, x W_g]) W_o with DenseFFN's weights {"wi", "wo"(, "wi_gate")}."""
  h_TF = x_TD @ shared["wi"]
  if kind == "swiglu":
    h_TF = jax.nn.silu(x_TD @ shared["wi_gate"]) * h_TF
  else:
    h_TF = jax.nn.gelu(h_TF)
  return h_TF @ shared["wo"]


def adapter_moe_ffn(x_TD: jax.Array, shared: Mapping[str, jax.Array], down_EDR: jax.Array,
                    up_ERD: jax.Array, plan: plan_lib.DispatchPlan, kind: str, *,
                    implementation: str = "auto", tile: int = gmm_lib.DEFAULT_TILING[0]
                    ) -> jax.Array:
  """y_t = F(x_t) + sum_k g_tk gelu(F(x_t) W^down_{e_tk}) W^up_{e_tk} (module docstring): `[T, D]`.

  plan: the router's plan for x_TD. kind: the shared FFN's "ffn" (GELU) or "swiglu".
  implementation / tile: of the grouped matmul (`lora_experts.grouped_matmul`).
  """
  experts.check_expert_kind(kind)
  kwargs = {"implementation": implementation, "tile": tile}
  z_TD = shared_ffn(x_TD, shared, kind)
  h_MR = jax.nn.gelu(grouped_matmul(dispatch.dispatch(z_TD, plan), down_EDR, plan, **kwargs))
  delta_TD = dispatch.combine(grouped_matmul(h_MR, up_ERD, plan, **kwargs), plan)
  return z_TD + delta_TD.astype(z_TD.dtype)


def adapter_moe_experts(params: core.Params, x_TD: jax.Array, plan: plan_lib.DispatchPlan, *,
                        kind: str, implementation: str = "auto",
                        tile: int = gmm_lib.DEFAULT_TILING[0]) -> tuple[jax.Array, None]:
  """The `core.ExpertFn` of adapter_moe: `adapter_moe_ffn` on the params of `AdapterMoE`.

  params: the shared FFN {"wi", "wo"(, "wi_gate")}, "adapter_down" `[E, D, R]` and
  "adapter_up" `[E, R, D]`. x is cast to the shared weights' dtype. Nothing is exchanged
  between devices (None dropped pairs).
  """
  shared = {name: params[name] for name in SHARED_WEIGHTS if name in params}
  y_TD = adapter_moe_ffn(x_TD.astype(shared["wi"].dtype), shared, params[DOWN], params[UP],
                         plan, kind, implementation=implementation, tile=tile)
  return y_TD, None


@FFNS.register("adapter_moe")
class AdapterMoE(nn.Module):
  """Mixture of bottleneck-adapter experts: one shared FFN, E routed adapters (PESC).

  `core.moe_apply` with the MoE layer's router function (`core.route_logits`) and the expert
  function `adapter_moe_experts`; routing, capacity, balancing losses and telemetry (aux keys)
  are the MoE layer's. `shares_router` as MoE. No expert-parallel path and no shared experts
  (the shared FFN is one by construction).

  Attributes:
    d_model: D. d_ff: F, hidden width of the shared FFN. num_experts: E adapters. k: adapters
      per token (default 2 with renormalised gates, as PESC).
    bottleneck: R >= 1, the adapters' hidden width.
    expert: the shared FFN, "ffn" (GELU, default; a DenseFFN "gelu") or "swiglu"; its params
      "wi", "wi_gate" (swiglu) and "wo" have DenseFFN's names, shapes and axes.
    router (one with its own weight "router_DE"; not "avg_k"), router_kwargs (default
      {"order": "softmax_then_topk", "renormalize": True}), capacity_factor,
      capacity_multiple, priority, load_balance_weight, importance_weight, z_loss_weight,
      router_loss_weight, jitter, bias_update_rate, implementation, tile, dtype, param_dtype:
      as the MoE layer's.

  Params: "adapter_down" `[E, D, R]` (truncated normal, fan-in), "adapter_up" `[E, R, D]`
  (zeros), "router_DE", and the shared FFN's.
  """
  shares_router: ClassVar[bool] = True
  d_model: int
  d_ff: int
  num_experts: int = 8
  k: int = 2
  bottleneck: int = 16
  expert: str = "ffn"
  router: str = "top_k"
  router_kwargs: Mapping[str, Any] = flax.core.FrozenDict(
      {"order": "softmax_then_topk", "renormalize": True})
  capacity_factor: float | None = None
  capacity_multiple: int = 1
  priority: str = "position"
  load_balance_weight: float = 1e-2
  importance_weight: float = 0.0
  z_loss_weight: float = 1e-3
  router_loss_weight: float = 1e-2
  jitter: float = 0.0
  bias_update_rate: float = 0.0
  implementation: str = "auto"
  tile: int = 128
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_routed_adapter_settings("adapter_moe", self)
    width = self.bottleneck
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
      raise ValueError(f"bottleneck must be a positive int, got {width!r}")
    super().__post_init__()

  def router_param(self, owner: nn.Module, name: str) -> jax.Array:
    """The router weight W_r `[D, E]` as param `name` of `owner` (this layer, or a model)."""
    return router_weight(owner, name, self.d_model, self.num_experts, self.param_dtype)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True,
               router_DE: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Returns (y_BTD, aux) with the MoE layer's aux (losses and metrics)."""
    batch, length, d_model = x_BTD.shape
    params = shared_ffn_params(self) | self._adapters() | router_params(self, router_DE)
    expert_fn = functools.partial(adapter_moe_experts, kind=self.expert,
                                  implementation=self.implementation, tile=self.tile)
    y_TD, aux = apply_with_learned_router(self, params, x_BTD.reshape(batch * length, d_model),
                                          expert_fn, deterministic=deterministic)
    return y_TD.reshape(x_BTD.shape), aux

  def _adapters(self) -> dict[str, jax.Array]:
    """{"adapter_down": W^down `[E, D, R]`, "adapter_up": W^up `[E, R, D]` (zeros)}."""
    shape = (self.num_experts, self.d_model, self.bottleneck)
    down = self.param(DOWN, nn.with_logical_partitioning(_DOWN_INIT, ("expert", "embed", None)),
                      shape, self.param_dtype)
    up = self.param(UP, nn.with_logical_partitioning(nn.initializers.zeros,
                                                     ("expert", None, "embed")),
                    (self.num_experts, self.bottleneck, self.d_model), self.param_dtype)
    return {DOWN: down.astype(self.dtype), UP: up.astype(self.dtype)}
