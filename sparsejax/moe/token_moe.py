"""Token-mixing MLPs for attention-free LMs: gMLP's causal spatial gating unit and sMLP's sMoE.

Both are token mixers (registered in `ATTENTIONS`, so they take the place of attention in a
`TransformerLM` block) built on one gated unit:

  u, v = split(gelu(x W_in)),  W_in: D x 2D
  y    = (u * mix(RMSNorm(v))) W_out,  W_out: D x D

where `mix` runs along the tokens. "token_mlp" mixes every feature with one causal spatial matrix
(gMLP); "token_moe" chunks the D features into H = num_heads chunks and sends each chunk to one of
E spatial experts (sMLP's sMoE): routing along the feature dimension, each expert mixing tokens.
Spatial weights are L x L with L = max_len, used as W[:T, :T] lower-triangular, so position t
reads only positions s <= t.

Shape letters beyond the DESIGN legend: L = max_len (spatial weights), C = D / H features per
chunk, S the source position of a token mix.
Liu et al. 2021, "Pay Attention to MLPs" (gMLP); Yu et al. 2022, "Efficient Language Modeling
with Sparse all-MLP" (sMLP).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux, empty_aux
from sparsejax.models.layers import check_attention_fields, logical_param
from sparsejax.moe import balance
from sparsejax.registry import ATTENTIONS

CHUNK_ROUTERS = ("deterministic", "prefix")
_SPATIAL_INIT = nn.initializers.normal(stddev=1e-3)  # gMLP: W near zero, b = 1


def causal_token_mix(v_BTHC: jax.Array, w_BHLL: jax.Array, b_BHL: jax.Array) -> jax.Array:
  """y[b, t, h, c] = sum_{s <= t} W[b, h, t, s] v[b, s, h, c] + bias[b, h, t].

  Each (sequence, chunk) pair has its own spatial weight W[b, h]: L x L (L >= T, the top-left
  T x T block is used, masked lower-triangular) and bias[b, h]: L; broadcastable leading dims
  (e.g. W of shape (1, H, L, L)) share one weight. Causal: y at t never reads v at s > t.
  """
  length = v_BTHC.shape[1]
  if w_BHLL.shape[-1] < length:
    raise ValueError(f"sequence length {length} exceeds the spatial weights' max_len "
                     f"{w_BHLL.shape[-1]}")
  w_BHTS = jnp.tril(w_BHLL[..., :length, :length])
  y_BTHC = jnp.einsum("bhts,bshc->bthc", w_BHTS, v_BTHC)
  return y_BTHC + jnp.swapaxes(b_BHL[..., :length], -1, -2)[..., None]


def route_deterministic(batch: int, num_chunks: int, num_experts: int) -> jax.Array:
  """expert_BH[b, h] = h mod E: chunk h always goes to the same expert (sMLP-deterministic)."""
  return jnp.broadcast_to(jnp.arange(num_chunks) % num_experts, (batch, num_chunks))


def prefix_length(length: int, prefix_fraction: float) -> int:
  """P = ceil(prefix_fraction * T), at least 1: the tokens a "prefix" router reads."""
  return max(1, math.ceil(prefix_fraction * length))


def route_prefix(v_BTHC: jax.Array, router_CE: jax.Array,
                 prefix: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(expert_BH, gate_BH, probs_BHE): top-1 expert of each chunk from the first P tokens.

  logits[b, h] = (mean_{t < P} v[b, t, h, :]) W_r, W_r: C x E, in float32; p = softmax(logits),
  expert = argmax p, gate = p[expert] (Switch, so the router gets a gradient). sMLP's partial
  prediction: only positions t >= P - 1 are causal; the loss should skip the first P positions.
  """
  summary_BHC = jnp.mean(v_BTHC[:, :prefix].astype(jnp.float32), axis=1)
  probs_BHE = jax.nn.softmax(summary_BHC @ router_CE.astype(jnp.float32), axis=-1)
  expert_BH = jnp.argmax(probs_BHE, axis=-1)
  gate_BH = jnp.take_along_axis(probs_BHE, expert_BH[..., None], axis=-1)[..., 0]
  return expert_BH, gate_BH, probs_BHE


def token_moe_mix(v_BTHC: jax.Array, w_ELL: jax.Array, b_EL: jax.Array, expert_BH: jax.Array,
                  gate_BH: jax.Array) -> jax.Array:
  """y[b, :, h] = gate[b, h] * (W_e v[b, :, h] + b_e) with e = expert[b, h]: chunk h of
  sequence b mixed along the tokens by its expert's causal spatial weight."""
  y_BTHC = causal_token_mix(v_BTHC, w_ELL[expert_BH], b_EL[expert_BH])
  return y_BTHC * gate_BH[:, None, :, None].astype(y_BTHC.dtype)


def _check_token_mixer(module: nn.Module) -> None:
  """One-line ValueErrors for a token mixer's contract fields and max_len."""
  check_attention_fields(module.d_model, module.num_heads, module.positions)
  if module.max_len is None or module.max_len < 1:
    raise ValueError(f"token mixer max_len must be a positive int (the model's), got "
                     f"{module.max_len!r}")


def _gated_unit(module: nn.Module, x_BTD: jax.Array, mix) -> tuple[jax.Array, Aux]:
  """(u * mix(RMSNorm(v))) W_out with u, v = split(gelu(x W_in)); `mix(v_BTHC) -> (y, aux)`."""
  d_model = module.d_model
  x_BTD = x_BTD.astype(module.dtype)
  w_in = logical_param(module, "w_in", nn.initializers.lecun_normal(), (d_model, 2 * d_model),
                       ("embed", "mlp"), module.dtype)
  u_BTD, v_BTD = jnp.split(nn.gelu(x_BTD @ w_in, approximate=True), 2, axis=-1)
  v_BTD = nn.RMSNorm(epsilon=1e-6, dtype=module.dtype, name="v_norm", scale_init=(
      nn.with_logical_partitioning(nn.initializers.ones, ("mlp",))))(v_BTD)
  batch, length, _ = x_BTD.shape
  v_BTHC = v_BTD.reshape(batch, length, module.num_heads, d_model // module.num_heads)
  mixed_BTHC, aux = mix(v_BTHC)
  w_out = logical_param(module, "w_out", nn.initializers.lecun_normal(), (d_model, d_model),
                        ("mlp", "embed"), module.dtype)
  return (u_BTD * mixed_BTHC.reshape(u_BTD.shape)) @ w_out, aux


def _spatial_params(module: nn.Module, num: int,
                    axis: str | None) -> tuple[jax.Array, jax.Array]:
  """`num` spatial weights "spatial_ELL" (init near 0) and biases "spatial_bias_EL" (init 1)."""
  w_ELL = logical_param(module, "spatial_ELL", _SPATIAL_INIT, (num, module.max_len, module.max_len),
                        (axis, None, None), module.dtype)
  b_EL = logical_param(module, "spatial_bias_EL", nn.initializers.ones, (num, module.max_len),
                       (axis, None), module.dtype)
  return w_ELL, b_EL


@ATTENTIONS.register("token_mlp")
class TokenMLP(nn.Module):
  """gMLP's spatial gating unit as a causal token mixer: one spatial weight for all features.

  y = (u * (W RMSNorm(v) + b)) W_out with u, v = split(gelu(x W_in)), W: L x L causal (lower-
  triangular) over positions, b: L; W starts near 0 and b at 1, so y starts as u W_out. The
  model passes max_len (L >= every sequence length). num_heads and positions are accepted for
  the token-mixer contract; the spatial weight is position-aware by itself. No dropout.
  Liu et al. 2021, "Pay Attention to MLPs" (gMLP, causal variant for LM).
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  max_len: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    _check_token_mixer(self)
    w_ELL, b_EL = _spatial_params(self, 1, None)

    def mix(v_BTHC):
      batch, length, heads, chunk = v_BTHC.shape
      v_BT1D = v_BTHC.reshape(batch, length, 1, heads * chunk)
      return causal_token_mix(v_BT1D, w_ELL[None], b_EL[None]).reshape(v_BTHC.shape), empty_aux()

    return _gated_unit(self, x_BTD, mix)


@ATTENTIONS.register("token_moe")
class TokenMoE(nn.Module):
  """sMLP's sMoE: feature chunks routed to spatial (token-mixing) experts, as a causal mixer.

  The gated unit of `TokenMLP`, with RMSNorm(v) cut along the features into H = num_heads
  chunks v_h: T x C; chunk h of sequence b goes to one expert e of E (each a causal spatial
  weight W_e: L x L and bias b_e: L): mix(v)_h = g_bh (W_e v_h + b_e). Every chunk goes through
  exactly one expert, so compute is one spatial matmul per feature whatever E, and E x the
  parameters of one spatial weight.

  Routers:
    "deterministic": chunk h -> expert h mod E, gate 1 (sMLP-deterministic; E must divide H).
      Causal at every position.
    "prefix": learned top-1 from the chunk's mean over the first P = ceil(prefix_fraction T)
      tokens, with the Switch load-balance loss (`route_prefix`); sMLP's partial prediction.
      Positions t < P - 1 then see tokens up to P - 1, so in an LM the loss must skip them
      (the "lm" task trains on every position: use "deterministic" there).
  Returns aux losses {"load_balance"} (prefix) and metrics {"expert_load": E fractions of
  the B x H chunks}.
  Yu et al. 2022, "Efficient Language Modeling with Sparse all-MLP" (sMoE, deterministic
  routing and partial prediction).
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  max_len: int | None = None
  num_experts: int = 4
  router: str = "deterministic"
  prefix_fraction: float = 0.2
  load_balance_weight: float = 1e-2
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.router not in CHUNK_ROUTERS:
      raise ValueError(f"token_moe router={self.router!r}; allowed: {', '.join(CHUNK_ROUTERS)}")
    if self.num_experts < 1:
      raise ValueError(f"token_moe num_experts must be >= 1, got {self.num_experts}")
    if self.router == "deterministic" and self.num_heads % self.num_experts:
      raise ValueError(f"token_moe router='deterministic' needs num_experts dividing num_heads="
                       f"{self.num_heads} (chunk h -> expert h mod E), got {self.num_experts}")
    if not 0 < self.prefix_fraction <= 1:
      raise ValueError(f"token_moe prefix_fraction must be in (0, 1], got {self.prefix_fraction}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout; routing is the same in training and eval.
    _check_token_mixer(self)
    w_ELL, b_EL = _spatial_params(self, self.num_experts, "expert")
    router_CE = None
    if self.router == "prefix":
      router_CE = logical_param(self, "router_CE", nn.initializers.lecun_normal(),
                                (self.d_model // self.num_heads, self.num_experts),
                                (None, None), jnp.float32)

    def mix(v_BTHC):
      batch, length, heads, _ = v_BTHC.shape
      losses = {}
      if router_CE is None:
        expert_BH = route_deterministic(batch, heads, self.num_experts)
        gate_BH = jnp.ones(expert_BH.shape, v_BTHC.dtype)
      else:
        prefix = prefix_length(length, self.prefix_fraction)
        expert_BH, gate_BH, probs_BHE = route_prefix(v_BTHC, router_CE, prefix)
      load_E = jnp.mean(jax.nn.one_hot(expert_BH, self.num_experts), axis=(0, 1))
      if router_CE is not None:
        probs_TE = probs_BHE.reshape(-1, self.num_experts)
        losses["load_balance"] = self.load_balance_weight * balance.load_balance_loss(
            probs_TE, load_E)
      y_BTHC = token_moe_mix(v_BTHC, w_ELL, b_EL, expert_BH, gate_BH)
      return y_BTHC, {"losses": losses, "metrics": {"expert_load": load_E}}

    return _gated_unit(self, x_BTD, mix)
