"""Mixture of LoRA experts over one shared FFN: every token uses the shared weights plus its
routed experts' low-rank adapters.

For each adapted projection W: I x O of the shared FFN (W_i, W_g: D x F on the input side,
W_o: F x D on the output side) and a token t routed to experts e_t1..e_tK with gates g_tk:

  u_t W  ->  u_t W + s sum_k g_tk (u_t A^W_{e_tk}) B^W_{e_tk},    A^W_e: I x R, B^W_e: R x O,

so the FFN is y_t = act(x_t W_i'(t) [, x_t W_g'(t)]) W_o'(t) with every W'(t) the token's own
low-rank update of the shared weight; s is LoRA's alpha / R. One routing decision per token and
layer serves all of its adapted projections. Experts are adapters, not FFNs: E experts cost
E R (I + O) params per projection. B starts at 0, so a fresh layer computes the shared FFN.

The adapters run on the router's expert-sorted rows: one row gather per projection input, a
grouped matmul `kernels.gmm` down to rank R and one back up (dropless plans), or a batched
einsum on `[E, C, .]` buffers (capacity plans, e.g. expert choice), then one gate-weighted
combine; no expert ever sees a token it was not routed.

Shape letters beyond the DESIGN legend: R the LoRA rank; I, O the input and output width of
one adapted projection; M the rows of the expert-sorted layout.

Mixture of LoRA experts: Zadouri et al., 2023, "Pushing Mixture of Experts to the Limit"
(MoLoRA); Chen et al., 2024, "LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data
Conflicts in Instruction Finetuning MLLMs" (top-1 LoRA experts on the MLP); Wu et al., 2024,
"Parameter-Efficient Sparsity Crafting from Dense to Mixture-of-Experts for Instruction Tuning
on General Tasks" (PESC: shared FFN weights, per-expert adapters, only adapters and router
trained). LoRA: Hu et al., 2021.

Training only adapters and routers, as MoLE and PESC do:

  tx = lora_experts.make_adapter_optimizer(optax.adamw(1e-3))   # the rest gets zero updates

or `optax.multi_transform({...}, lora_experts.param_labels)` with your own transformations.
`load_dense_ffn` fills the shared FFN (and every other param) from a dense model's params.
"""
import functools
from typing import Any, ClassVar, Mapping

import flax.core
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

from kernels import gmm as gmm_lib
from sparsejax.auxiliary import Aux
from sparsejax.moe import core
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from sparsejax.moe.layers import apply_with_learned_router
from sparsejax.moe.layers import router_params
from sparsejax.moe.layers import router_weight
from sparsejax.registry import FFNS

TARGETS = ("in", "out")
# Shared FFN weights (named as in `sparsejax.models.DenseFFN`), their side and logical axes.
SHARED_WEIGHTS = {"wi": ("in", ("embed", "mlp")), "wi_gate": ("in", ("embed", "mlp")),
                  "wo": ("out", ("mlp", "embed"))}
LORA_A, LORA_B = "_lora_a", "_lora_b"  # suffixes of adapter params, e.g. "wi_lora_a"
# Every routed adapter param: LoRA's, and the bottleneck adapters of `adapter_experts` (PESC).
ADAPTER_SUFFIXES = (LORA_A, LORA_B, "adapter_down", "adapter_up")
ROUTER = "router_DE"
SHARED_ROUTER = "shared_router"  # TransformerLM(shared_router=True)'s router weight
ADAPTERS_LABEL, FROZEN_LABEL = "adapters", "frozen"

_LORA_A_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


def grouped_matmul(u_MI: jax.Array, w_EIO: jax.Array, plan: plan_lib.DispatchPlan, *,
                   implementation: str = "auto", tile: int = gmm_lib.DEFAULT_TILING[0]
                   ) -> jax.Array:
  """Row m times its expert's matrix, rows in the layout of `dispatch.dispatch(., plan)`.

  Dropless plans: `kernels.gmm.gmm` over the expert-sorted rows (row tile `tile`); capacity
  plans: a batched einsum over the `[E, C, I]` buffers. `[M, I]` -> `[M, O]`.
  """
  if plan.capacity is None:
    tiling = (tile,) + gmm_lib.DEFAULT_TILING[1:]
    return gmm_lib.gmm(u_MI, w_EIO, plan_lib.group_sizes(plan), implementation=implementation,
                       tiling=tiling)
  u_ECI = u_MI.reshape(plan.num_experts, plan.capacity, u_MI.shape[-1])
  return jnp.einsum("eci,eio->eco", u_ECI, w_EIO).reshape(u_MI.shape[0], w_EIO.shape[-1])


def lora_delta(u_MI: jax.Array, a_EIR: jax.Array, b_ERO: jax.Array,
               plan: plan_lib.DispatchPlan, *, scale: float = 1.0, implementation: str = "auto",
               tile: int = gmm_lib.DEFAULT_TILING[0]) -> jax.Array:
  """delta_t = s sum_k g_tk (u_t A_{e_tk}) B_{e_tk} from dispatched rows u_MI: `[T, O]`."""
  kwargs = {"implementation": implementation, "tile": tile}
  z_MR = grouped_matmul(u_MI, a_EIR, plan, **kwargs)
  delta_MO = grouped_matmul(z_MR, b_ERO, plan, **kwargs)
  return scale * dispatch.combine(delta_MO, plan)


def lora_moe_ffn(x_TD: jax.Array, shared: Mapping[str, jax.Array],
                 adapters: Mapping[str, tuple[jax.Array, jax.Array]],
                 plan: plan_lib.DispatchPlan, kind: str, *, scale: float = 1.0,
                 implementation: str = "auto", tile: int = gmm_lib.DEFAULT_TILING[0]
                 ) -> jax.Array:
  """The shared FFN with each token's routed low-rank updates (module docstring): `[T, D]`.

  Args:
    x_TD: tokens. shared: {"wi", "wo"} (+ "wi_gate" for swiglu), `[D, F]` / `[F, D]`.
    adapters: adapted weight name -> (A_EIR, B_ERO); names not listed are not adapted.
    plan: the router's plan for x_TD. kind: "ffn" (GELU) or "swiglu".
    scale: s. implementation / tile: of the grouped matmul (see `grouped_matmul`).
  """
  experts.check_expert_kind(kind)
  unknown = sorted(set(adapters) - set(shared))
  if unknown:
    raise ValueError(f"adapters {unknown} adapt no weight of the shared FFN {sorted(shared)}")
  kwargs = {"scale": scale, "implementation": implementation, "tile": tile}

  def project(u_TI, u_MI, name):
    out = u_TI @ shared[name]
    if name in adapters:
      out = out + lora_delta(u_MI, *adapters[name], plan, **kwargs).astype(out.dtype)
    return out

  x_MD = dispatch.dispatch(x_TD, plan) if "wi" in adapters or "wi_gate" in adapters else None
  h_TF = project(x_TD, x_MD, "wi")
  if kind == "swiglu":
    h_TF = jax.nn.silu(project(x_TD, x_MD, "wi_gate")) * h_TF
  else:
    h_TF = jax.nn.gelu(h_TF)
  h_MF = dispatch.dispatch(h_TF, plan) if "wo" in adapters else None
  return project(h_TF, h_MF, "wo")


def lora_moe_experts(params: core.Params, x_TD: jax.Array, plan: plan_lib.DispatchPlan, *,
                     kind: str, scale: float = 1.0, implementation: str = "auto",
                     tile: int = gmm_lib.DEFAULT_TILING[0]) -> tuple[jax.Array, None]:
  """The `core.ExpertFn` of lora_moe: `lora_moe_ffn` on the params of `LoRAMoE`.

  params: the shared FFN {"wi", "wo"(, "wi_gate")} and the adapters {w + "_lora_a",
  w + "_lora_b"} of every adapted weight w. x is cast to the shared weights' dtype. Nothing
  is exchanged between devices, so no pair is dropped by an exchange (None).
  """
  shared = {name: params[name] for name in SHARED_WEIGHTS if name in params}
  adapters = {name: (params[name + LORA_A], params[name + LORA_B]) for name in shared
              if name + LORA_A in params}
  y_TD = lora_moe_ffn(x_TD.astype(shared["wi"].dtype), shared, adapters, plan, kind,
                      scale=scale, implementation=implementation, tile=tile)
  return y_TD, None


def shared_ffn_params(module: nn.Module) -> dict[str, jax.Array]:
  """The shared FFN's weights as DenseFFN creates them ("wi", "wo"(, "wi_gate")), params of
  `module` (fields d_model, d_ff, expert, dtype, param_dtype), in its dtype."""
  names = ("wi", "wi_gate", "wo") if module.expert == "swiglu" else ("wi", "wo")
  shapes = {"wi": (module.d_model, module.d_ff), "wi_gate": (module.d_model, module.d_ff),
            "wo": (module.d_ff, module.d_model)}
  return {name: module.param(name, nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), SHARED_WEIGHTS[name][1]), shapes[name],
                             module.param_dtype).astype(module.dtype) for name in names}


def check_routed_adapter_settings(layer: str, module: nn.Module) -> None:
  """ValueError for the router, expert kind or capacity settings of a routed-adapter layer
  `layer` ("lora_moe", "adapter_moe") that it cannot use (`module`'s fields)."""
  if module.router in routing.EXPERT_LOGITS:
    raise ValueError(f"router {module.router!r} reads expert FFN weights, which {layer}'s "
                     f"adapters are not; use a router with its own weight, e.g. 'top_k'")
  core.check_router_settings(module.router, module.k, module.num_experts, module.jitter,
                             module.bias_update_rate)
  experts.check_expert_kind(module.expert)
  core.check_capacity_settings(module.capacity_factor, module.priority)


@FFNS.register("lora_moe")
class LoRAMoE(nn.Module):
  """Mixture of LoRA experts: one shared FFN, E routed rank-R adapters (module docstring).

  y_t = FFN with W'(t) = W + s sum_k g_tk A_{e_tk} B_{e_tk} for each adapted W:
  `core.moe_apply` with the MoE layer's router function (`core.route_logits`) and the expert
  function `lora_moe_experts`. Routing, capacity, balancing losses and telemetry are the MoE
  layer's (same aux keys: expert load, router entropy, z-loss, dropped fraction; losses
  load_balance, router_z, ...). `shares_router` as MoE: `TransformerLM(shared_router=True)`
  works. There is no expert-parallel path (the adapters run beside one shared FFN,
  partitioned by GSPMD) and no shared experts (the shared FFN is one by construction).

  Attributes:
    d_model: D. d_ff: F, hidden width of the shared FFN. num_experts: E adapters. k: adapters
      per token (default 1, as LLaVA-MoLE; PESC uses 2).
    expert: the shared FFN, "ffn" (GELU, default; a DenseFFN "gelu") or "swiglu". Its params
      "wi", "wi_gate" (swiglu) and "wo" have DenseFFN's names, shapes and axes, so a dense
      model's FFN loads as is (`load_dense_ffn`).
    rank: R >= 1. scale: s, LoRA's alpha / R.
    targets: adapted sides, a non-empty subset of ("in", "out"): "in" the input projections
      W_i (and W_g for swiglu), "out" the output projection W_o. Adapter params are
      "{w}_lora_a" `[E, I, R]` (truncated normal, fan-in) and "{w}_lora_b" `[E, R, O]` (zeros).
    router (one with its own weight "router_DE"; not "avg_k", which reads expert FFN
      weights), router_kwargs, capacity_factor, capacity_multiple, priority,
      load_balance_weight, importance_weight, z_loss_weight, router_loss_weight, jitter,
      bias_update_rate, implementation, tile, dtype, param_dtype: as the MoE layer's.
  """
  shares_router: ClassVar[bool] = True
  d_model: int
  d_ff: int
  num_experts: int = 8
  k: int = 1
  rank: int = 8
  scale: float = 1.0
  targets: tuple[str, ...] = TARGETS
  expert: str = "ffn"
  router: str = "top_k"
  router_kwargs: Mapping[str, Any] = flax.core.FrozenDict()
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
    check_routed_adapter_settings("lora_moe", self)
    rank = self.rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
      raise ValueError(f"rank must be a positive int, got {rank!r}")
    targets = tuple(self.targets)
    if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(TARGETS):
      raise ValueError(f"targets must be a non-empty subset of {TARGETS} without repeats, got "
                       f"{self.targets!r}")
    super().__post_init__()

  def router_param(self, owner: nn.Module, name: str) -> jax.Array:
    """The router weight W_r `[D, E]` as param `name` of `owner` (this layer, or a model)."""
    return router_weight(owner, name, self.d_model, self.num_experts, self.param_dtype)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True,
               router_DE: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Returns (y_BTD, aux) with the MoE layer's aux (losses and metrics)."""
    batch, length, d_model = x_BTD.shape
    shared = shared_ffn_params(self)
    params = shared | router_params(self, router_DE)
    for name, w_IO in shared.items():
      if SHARED_WEIGHTS[name][0] in self.targets:
        params[name + LORA_A], params[name + LORA_B] = self._adapter(name, w_IO.shape)
    expert_fn = functools.partial(lora_moe_experts, kind=self.expert, scale=self.scale,
                                  implementation=self.implementation, tile=self.tile)
    y_TD, aux = apply_with_learned_router(self, params, x_BTD.reshape(batch * length, d_model),
                                          expert_fn, deterministic=deterministic)
    return y_TD.reshape(x_BTD.shape), aux

  def _adapter(self, name: str, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """(A_EIR, B_ERO) of the shared weight `name` of shape (I, O)."""
    (in_axis, out_axis), (width_in, width_out) = SHARED_WEIGHTS[name][1], shape
    a_EIR = self.param(name + LORA_A, nn.with_logical_partitioning(
        _LORA_A_INIT, ("expert", in_axis, None)), (self.num_experts, width_in, self.rank),
                       self.param_dtype)
    b_ERO = self.param(name + LORA_B, nn.with_logical_partitioning(
        nn.initializers.zeros, ("expert", None, out_axis)),
                       (self.num_experts, self.rank, width_out), self.param_dtype)
    return a_EIR.astype(self.dtype), b_ERO.astype(self.dtype)


def _flat(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), is_leaf=lambda _, v: (
      not isinstance(v, Mapping)))


def param_labels(params: Mapping[str, Any]) -> Any:
  """A tree like `params` labelling each leaf "adapters" or "frozen" (for multi_transform).

  "adapters": the "{w}_lora_a" / "{w}_lora_b" params (or adapter_moe's "adapter_down" /
  "adapter_up": `ADAPTER_SUFFIXES`) and the "router_DE" of every module that holds them, and
  a top-level "shared_router" (TransformerLM's Omni-Router) when any module does; "frozen":
  everything else (shared FFNs, attention, embeddings, norms). Leaves may be boxed
  (`nn.LogicallyPartitioned`); the label replaces the whole box. Raises ValueError when
  `params` holds no adapter, so freezing never silently freezes everything.
  """
  flat = _flat(params)
  lora_modules = {path[:-1] for path in flat if path[-1].endswith(ADAPTER_SUFFIXES)}
  if not lora_modules:
    raise ValueError("params hold no LoRA adapter (a '*_lora_a' param of a lora_moe layer) nor "
                     "bottleneck adapter (adapter_moe); nothing would be trained")

  def label(path):
    trained = (path[:-1] in lora_modules and (path[-1].endswith(ADAPTER_SUFFIXES)
                                              or path[-1] == ROUTER)) or path == (SHARED_ROUTER,)
    return ADAPTERS_LABEL if trained else FROZEN_LABEL

  labels = flax.traverse_util.unflatten_dict({path: label(path) for path in flat})
  return labels if isinstance(params, dict) else type(params)(labels)


def make_adapter_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the params `param_labels` calls "adapters", zero updates (and no state) elsewhere."""
  return optax.multi_transform({ADAPTERS_LABEL: tx, FROZEN_LABEL: optax.set_to_zero()},
                               param_labels)


def load_dense_ffn(dense_params: Mapping[str, Any], lora_params: Mapping[str, Any]
                   ) -> dict[str, Any]:
  """`lora_params` with every leaf that `dense_params` also holds (same path) taken from it.

  With a dense TransformerLM's params and a lora_moe LM's (e.g. a fresh init), this gives the
  PESC / MoLE start: shared FFN, attention, embeddings and norms from the dense model,
  adapters (B = 0) and routers fresh, so the model first computes the dense one's function.
  The dense FFN's activation must match lora_moe's `expert` ("gelu" <-> "ffn", "swiglu" <->
  "swiglu"). Raises ValueError naming the param when a shared path's shape differs, or when a
  dense param has no place in `lora_params`. Returns unboxed params.
  """
  dense = {path: nn.unbox(value) for path, value in _flat(dense_params).items()}
  lora = {path: nn.unbox(value) for path, value in _flat(lora_params).items()}
  unused = sorted("/".join(path) for path in set(dense) - set(lora))
  if unused:
    raise ValueError(f"dense params {unused} have no counterpart in the lora_moe params")
  for path in dense:
    if jnp.shape(dense[path]) != jnp.shape(lora[path]):
      raise ValueError(f"param {'/'.join(path)}: dense shape {jnp.shape(dense[path])} != "
                       f"lora_moe shape {jnp.shape(lora[path])}")
  for module in {path[:-1] for path in lora if path[-1].endswith(ADAPTER_SUFFIXES)}:
    gate = module + ("wi_gate",)
    if gate in lora and module + ("wi",) in dense and gate not in dense:
      raise ValueError(f"{'/'.join(module)}: the dense FFN has no 'wi_gate' (GELU) but the "
                       f"lora_moe FFN is swiglu; set expert='ffn' to match")
  merged = {path: dense.get(path, value) for path, value in lora.items()}
  return flax.traverse_util.unflatten_dict(merged)
