"""Finedeep: a dense FFN split into fine-grained experts on stacked sub-layers, all active.

The FFN of hidden width F becomes M sub-layers of K experts, expert (m, k) an FFN of hidden
F / (M K), so the M K experts hold the dense FFN's parameters and FLOPs. Every expert of every
sub-layer runs on every token; each sub-layer weighs its experts' outputs by its own router,
which scores an expert by its output (sigmoid), normalised across the sub-layer's experts.
Sub-layers are chained with an RMSNorm in front and a residual around each:

  u_0  = x
  h_m  = RMSNorm_m(u_{m-1})                          (scale s_m in R^D)
  o_mk = FFN_mk(h_m),                  k = 1..K      (GELU or SwiGLU, hidden F / (M K))
  r_mk = sigmoid(o_mk . w_m)                         (router w_m in R^D, output-guided)
  g_mk = r_mk / sum_j r_mj
  u_m  = u_{m-1} + sum_k g_mk o_mk
  y    = u_M - x = sum_m sum_k g_mk o_mk

The layer returns y, which the block adds to its residual stream. x is the block's pre-norm
output, so the first sub-layer's RMSNorm sees what the paper's sees (RMSNorm is scale-invariant)
and later sub-layers chain on that normalised stream. w_m starts at 0: a fresh sub-layer averages
its experts (g_mk = 1 / K). Sigmoid scores, unlike a softmax, do not make experts compete, and no
gate is 0: the point of the paper is an FFN whose units are all used.

Shape letters beyond the DESIGN legend: M sub-layers, K experts per sub-layer (here K is not
top-k), F the hidden width of one expert.

Pan et al., 2025, "Finedeep: Mitigating Sparse Activation in Dense LLMs via Multi-Layer
Fine-Grained Experts" (arXiv 2502.12928).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.moe import experts as experts_lib
from sparsejax.moe import routing
from sparsejax.registry import FFNS

_EXPERT_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0, 1))
WEIGHT_AXES = {"wi_MKDF": (None, None, "embed", "mlp"), "wg_MKDF": (None, None, "embed", "mlp"),
               "wo_MKFD": (None, None, "mlp", "embed")}


def rms_norm(x_TD: jax.Array, scale_D: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(mean_d x^2 + eps) * scale, in float32, cast back to x's dtype."""
  x = x_TD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32)).astype(x_TD.dtype)


def sublayer(h_TD: jax.Array, weights: dict[str, jax.Array], router_D: jax.Array, kind: str
             ) -> tuple[jax.Array, jax.Array]:
  """One sub-layer's K experts on every token and their output-guided gates.

  o_tk = FFN_k(h_t); g_tk = sigmoid(o_tk . w) / sum_j sigmoid(o_tj . w), in float32.
  weights: {"wi_KDF", "wo_KFD"(, "wg_KDF")}. Returns (sum_k g_tk o_tk: `[T, D]`, g_TK).
  """
  hidden_KTF = jnp.einsum("td,kdf->ktf", h_TD, weights["wi_KDF"])
  if kind == "swiglu":
    hidden_KTF = jax.nn.silu(jnp.einsum("td,kdf->ktf", h_TD, weights["wg_KDF"])) * hidden_KTF
  else:
    hidden_KTF = jax.nn.gelu(hidden_KTF)
  out_KTD = jnp.einsum("ktf,kfd->ktd", hidden_KTF, weights["wo_KFD"])  # expert-major: faster
  score_KT = jax.nn.sigmoid(jnp.einsum("ktd,d->kt", out_KTD.astype(jnp.float32),
                                       router_D.astype(jnp.float32)))
  gate_KT = score_KT / jnp.sum(score_KT, axis=0, keepdims=True)
  y_TD = jnp.einsum("kt,ktd->td", gate_KT.astype(out_KTD.dtype), out_KTD)
  return y_TD, gate_KT.T


def finedeep_ffn(x_TD: jax.Array, params: dict[str, jax.Array], kind: str, eps: float = 1e-6
                 ) -> tuple[jax.Array, jax.Array]:
  """The Finedeep FFN (module docstring) on tokens x_TD, sub-layer after sub-layer.

  params: "wi_MKDF", "wo_MKFD" (+ "wg_MKDF" for swiglu), "router_MD" (w_m), "norm_MD" (s_m).
  Returns (y_TD, gates g_MTK).
  """
  experts_lib.check_expert_kind(kind)
  names = [name for name in WEIGHT_AXES if name in params]
  u_TD, y_TD, gates = x_TD, jnp.zeros_like(x_TD), []
  for m in range(params["router_MD"].shape[0]):  # M is small: unrolled, faster than a scan
    weights = {name.replace("_MK", "_K"): params[name][m] for name in names}
    s_TD, gate_TK = sublayer(rms_norm(u_TD, params["norm_MD"][m], eps), weights,
                             params["router_MD"][m], kind)
    u_TD, y_TD = u_TD + s_TD, y_TD + s_TD
    gates.append(gate_TK)
  gate_MTK = jnp.stack(gates)
  return y_TD, gate_MTK


@FFNS.register("finedeep")
class Finedeep(nn.Module):
  """Finedeep FFN: M stacked sub-layers of K fine-grained experts, all active (module docstring).

  Attributes:
    d_model: D. d_ff: the dense FFN's hidden width F_dense, split evenly: each expert has
      hidden F_dense / (M K) (must divide).
    num_sublayers: M >= 1. experts_per_sublayer: K >= 1.
    expert: "ffn" (GELU) or "swiglu". eps: RMSNorm epsilon.
    dtype / param_dtype: compute / parameter dtype (gates and norms in float32).

  Params: "wi_MKDF", "wo_MKFD"(, "wg_MKDF") truncated normal fan-in; "router_{m}" `[D]` zeros
  and "norm_{m}" `[D]` ones for each sub-layer m (stacked as `finedeep_ffn`'s "router_MD",
  "norm_MD"). Returns (y_BTD, aux) with no losses and metrics "gate_entropy" (mean over
  tokens and sub-layers of -sum_k g log g; log K when uniform), "gate_max" (mean largest gate)
  and "mean_gate_MK" (each expert's mean gate).
  """
  d_model: int
  d_ff: int
  num_sublayers: int = 2
  experts_per_sublayer: int = 4
  expert: str = "ffn"
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("d_model", "d_ff", "num_sublayers", "experts_per_sublayer"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
    num_experts = self.num_sublayers * self.experts_per_sublayer
    if self.d_ff % num_experts:
      raise ValueError(f"d_ff={self.d_ff} must be divisible by num_sublayers * "
                       f"experts_per_sublayer = {num_experts}")
    experts_lib.check_expert_kind(self.expert)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    """Returns (y_BTD, {"losses": {}, "metrics": gate statistics}); no training-only path."""
    del deterministic
    batch, length, d_model = x_BTD.shape
    y_TD, gate_MTK = finedeep_ffn(x_BTD.reshape(batch * length, d_model).astype(self.dtype),
                                  self._params(), self.expert, self.eps)
    metrics = {
        "gate_entropy": routing.router_entropy(gate_MTK),
        "gate_max": jnp.mean(jnp.max(gate_MTK, axis=-1)),
        "mean_gate_MK": jnp.mean(gate_MTK, axis=1),
    }
    return y_TD.reshape(x_BTD.shape), {"losses": {}, "metrics": metrics}

  def _params(self) -> dict[str, jax.Array]:
    m, k, d = self.num_sublayers, self.experts_per_sublayer, self.d_model
    hidden = self.d_ff // (m * k)
    shapes = {"wi_MKDF": (m, k, d, hidden), "wo_MKFD": (m, k, hidden, d)}
    if self.expert == "swiglu":
      shapes["wg_MKDF"] = (m, k, d, hidden)
    params = {name: self.param(name, nn.with_logical_partitioning(
        _EXPERT_INIT, WEIGHT_AXES[name]), shape, self.param_dtype).astype(self.dtype)
              for name, shape in shapes.items()}
    # One 1-D router vector and RMSNorm scale per sub-layer, so that weight decay and weight
    # masks treat them like every other norm scale (both skip 1-D params by default).
    params["router_MD"] = jnp.stack([self.param(f"router_{i}", nn.with_logical_partitioning(
        nn.initializers.zeros, ("embed",)), (d,), self.param_dtype) for i in range(m)])
    params["norm_MD"] = jnp.stack([self.param(f"norm_{i}", nn.with_logical_partitioning(
        nn.initializers.ones, ("embed",)), (d,), self.param_dtype) for i in range(m)])
    return params
