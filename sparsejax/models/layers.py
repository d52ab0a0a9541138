"""Dense Transformer layers: rotary position embedding, causal self-attention, feed-forward.

Both modules follow the layer contract documented in `sparsejax.models`:
`__call__(x_BTD, *, deterministic=True) -> (y_BTD, aux)`. Params are stored in float32 and
annotated with logical axis names (see `sparsejax.sharding`); `dtype` is the compute dtype.

Shape letters beyond the DESIGN legend: K is the per-head dim (d_model / num_heads) and R = K / 2
the number of rotary pairs.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux, empty_aux
from sparsejax.registry import ATTENTIONS, FFNS
from sparsejax.sites import Site

POSITIONS = ("rope", "learned")
ACTIVATIONS = ("gelu", "swiglu")


def logical_param(
    module: nn.Module,
    name: str,
    init: Callable[..., jax.Array],
    shape: Sequence[int],
    logical_axes: tuple[str | None, ...],
    dtype: Any,
) -> jax.Array:
  """Creates float32 param `name` annotated with `logical_axes`; returns it cast to `dtype`."""
  boxed_init = nn.with_logical_partitioning(init, logical_axes)
  return module.param(name, boxed_init, tuple(shape), jnp.float32).astype(dtype)


def apply_rope(
    x_BTHK: jax.Array, positions_BT: jax.Array, max_wavelength: float = 10_000.0
) -> jax.Array:
  """Rotates each pair (x_r, x_{r+R}) of every head by the angle position * theta_r.

  With theta_r = max_wavelength^(-2r/K) for r < R = K/2 and p the token's position:
    y_r     = x_r cos(p theta_r) - x_{r+R} sin(p theta_r)
    y_{r+R} = x_r sin(p theta_r) + x_{r+R} cos(p theta_r)
  so <rope(q, i), rope(k, j)> depends on the positions only through i - j. `positions_BT` may be
  any shape that broadcasts to (B, T), e.g. (1, T). Computed in float32, returned in x's dtype.
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (with the
  half-split pairing of GPT-NeoX).
  """
  head_dim = x_BTHK.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rope needs an even head dim, got {head_dim}")
  num_pairs = head_dim // 2
  theta_R = max_wavelength ** (-2.0 * jnp.arange(num_pairs, dtype=jnp.float32) / head_dim)
  angle_BTR = jnp.asarray(positions_BT, jnp.float32)[..., None] * theta_R
  cos_BT1R = jnp.cos(angle_BTR)[..., None, :]
  sin_BT1R = jnp.sin(angle_BTR)[..., None, :]
  first_BTHR, second_BTHR = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  y_BTHK = jnp.concatenate(
      [
          first_BTHR * cos_BT1R - second_BTHR * sin_BT1R,
          first_BTHR * sin_BT1R + second_BTHR * cos_BT1R,
      ],
      axis=-1,
  )
  return y_BTHK.astype(x_BTHK.dtype)


@ATTENTIONS.register("dense")
class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention, with RoPE on queries and keys when positions == "rope".

  q, k, v = x W_q, x W_k, x W_v with W_*: D -> H x K, K = D / H;
  o_h = softmax(q_h k_h^T / sqrt(K) + M) v_h with M_ij = -inf for j > i;
  y = concat_h(o_h) W_o. With positions == "learned" the model adds positions to its input and
  this layer sees none. No dropout: `deterministic` is accepted for the layer contract.
  Site (`sparsejax.sites`) "heads": o_BTHK, the per-head outputs before W_o.
  Vaswani et al. 2017, "Attention Is All You Need".
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  dtype: Any = jnp.float32
  rope_max_wavelength: float = 10_000.0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    check_attention_fields(self.d_model, self.num_heads, self.positions)
    q_BTHK, k_BTHK, v_BTHK = project_qkv(self, x_BTD)
    o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
    return project_out(self, Site(name="heads")(o_BTHK)), empty_aux()


def check_attention_fields(d_model: int, num_heads: int, positions: str) -> None:
  """One-line ValueErrors for the attention contract fields every attention layer checks."""
  if d_model % num_heads:
    raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r}; allowed: {', '.join(POSITIONS)}")


def project_qkv(module: nn.Module, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v = x W_q, x W_k, x W_v for an attention `module` (fields d_model, num_heads,
  positions, dtype, rope_max_wavelength), params "wq", "wk", "wv": D x H x K with K = D / H,
  annotated ("embed", "heads", "kv"); RoPE on q and k when positions == "rope". Call it from the
  module's compact `__call__`."""
  head_dim = module.d_model // module.num_heads
  x_BTD = x_BTD.astype(module.dtype)
  q_BTHK, k_BTHK, v_BTHK = (
      jnp.einsum("btd,dhk->bthk", x_BTD, logical_param(
          module, name, nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
          (module.d_model, module.num_heads, head_dim), ("embed", "heads", "kv"), module.dtype))
      for name in ("wq", "wk", "wv"))
  if module.positions == "rope":
    positions_1T = jnp.arange(x_BTD.shape[1])[None, :]
    q_BTHK = apply_rope(q_BTHK, positions_1T, module.rope_max_wavelength)
    k_BTHK = apply_rope(k_BTHK, positions_1T, module.rope_max_wavelength)
  return q_BTHK, k_BTHK, v_BTHK


def project_out(module: nn.Module, o_BTHK: jax.Array) -> jax.Array:
  """y = concat_h(o_h) W_o for an attention `module`, param "wo": H x K x D annotated
  ("heads", "kv", "embed")."""
  head_dim = module.d_model // module.num_heads
  w_HKD = logical_param(
      module, "wo", nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
      (module.num_heads, head_dim, module.d_model), ("heads", "kv", "embed"), module.dtype)
  return jnp.einsum("bthk,hkd->btd", o_BTHK, w_HKD)


@FFNS.register("dense")
class DenseFFN(nn.Module):
  """Position-wise feed-forward network with a GELU or SwiGLU hidden layer.

  gelu:   y = gelu(x W_in) W_out                     (tanh approximation of GELU)
  swiglu: y = (silu(x W_gate) * (x W_in)) W_out
  with W_in, W_gate: D x F and W_out: F x D; no biases. For swiglu, F is used as given (no 2/3
  rescaling). No dropout: `deterministic` is accepted for the layer contract.
  Sites (`sparsejax.sites`): "in" (x), "hidden" (the F hidden units gelu(x W_in), or the
  product for swiglu: the neuron site) and "out" (y).
  Vaswani et al. 2017, "Attention Is All You Need"; Shazeer 2020, "GLU Variants Improve
  Transformer" (swiglu).
  """

  d_model: int
  d_ff: int
  activation: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    x_BTD = Site(name="in")(x_BTD.astype(self.dtype))
    h_BTF = x_BTD @ self._weight("wi", (self.d_model, self.d_ff), ("embed", "mlp"))
    if self.activation == "gelu":
      h_BTF = nn.gelu(h_BTF, approximate=True)
    else:
      gate_BTF = x_BTD @ self._weight("wi_gate", (self.d_model, self.d_ff), ("embed", "mlp"))
      h_BTF = nn.silu(gate_BTF) * h_BTF
    h_BTF = Site(name="hidden")(h_BTF)
    y_BTD = h_BTF @ self._weight("wo", (self.d_ff, self.d_model), ("mlp", "embed"))
    return Site(name="out")(y_BTD), empty_aux()

  def _weight(self, name: str, shape: tuple[int, int], logical_axes: tuple[str, str]) -> jax.Array:
    return logical_param(
        self, name, nn.initializers.lecun_normal(), shape, logical_axes, self.dtype
    )
