"""Sparse Universal Transformer LM: one shared block applied recurrently, with dynamic halting.

The LM architecture "universal" (`LMS`; `model.architecture={"name": "universal", ...}`): the
embedding and head of `TransformerLM`, and in between ONE `DecoderBlock` (its FFN and attention
chosen as in `TransformerLM`, e.g. the "moe" FFN and, optionally, a routed attention) applied
up to L = num_layers times, with stick-breaking halting per token.

Shape letters as in DESIGN; the halting step index is l = 0 .. L - 1.
Tan et al. 2023, "Sparse Universal Transformer"; Dehghani et al. 2019, "Universal
Transformers"; Graves 2016, "Adaptive Computation Time for Recurrent Neural Networks".
"""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux, empty_aux, merge_aux
from sparsejax.models.layers import logical_param
from sparsejax.models.transformer import TransformerLM
from sparsejax.registry import LMS


class HaltingState(NamedTuple):
  """Stick-breaking halting after some steps, per token.

  remaining_BT: r = prod_j (1 - alpha_j), the mass not yet halted.
  mixed_BTD: sum_j p_j h_j, the halted states weighted by their halting probability p_j.
  depth_BT: sum_j j p_j, the halted mass's expected depth (blocks applied).
  """
  remaining_BT: jax.Array
  mixed_BTD: jax.Array
  depth_BT: jax.Array


def start_halting(x_BTD: jax.Array) -> HaltingState:
  """Nothing halted yet: r = 1, mixed = 0, depth = 0."""
  batch, length, _ = x_BTD.shape
  return HaltingState(jnp.ones((batch, length), jnp.float32), jnp.zeros_like(x_BTD),
                      jnp.zeros((batch, length), jnp.float32))


def halt_step(state: HaltingState, alpha_BT: jax.Array, h_BTD: jax.Array,
              step: int) -> HaltingState:
  """Halts mass p = alpha r on the state h after `step` blocks (stick-breaking).

  p_l = alpha_l prod_{j<l} (1 - alpha_j);  r <- r (1 - alpha_l);  mixed <- mixed + p_l h_l;
  depth <- depth + l p_l. Over any alpha sequence sum_l p_l + r = 1.
  """
  p_BT = alpha_BT * state.remaining_BT
  return HaltingState(state.remaining_BT * (1.0 - alpha_BT),
                      state.mixed_BTD + p_BT[..., None].astype(h_BTD.dtype) * h_BTD,
                      state.depth_BT + step * p_BT)


def mix_halted(state: HaltingState, y_BTD: jax.Array) -> jax.Array:
  """The next state: the halted mixture plus the remaining mass on the block's output,
  mixed + r y (the halting-weighted mixture of all states so far)."""
  return state.mixed_BTD + state.remaining_BT[..., None].astype(y_BTD.dtype) * y_BTD


class HaltingGate(nn.Module):
  """alpha = sigmoid(w_2 . gelu(h W_1 + b_1) + b_2), the per-token halting probability.

  W_1: D x D, w_2: D (zero at init, so alpha starts at sigmoid(bias_init) for every token).
  Tan et al. 2023 (the ACT gate of SUT).
  """

  d_model: int
  bias_init: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BTD: jax.Array) -> jax.Array:
    w1_DD = logical_param(self, "w1", nn.initializers.lecun_normal(),
                          (self.d_model, self.d_model), ("embed", "mlp"), self.dtype)
    b1_D = logical_param(self, "b1", nn.initializers.zeros, (self.d_model,), ("mlp",), self.dtype)
    w2_D = logical_param(self, "w2", nn.initializers.zeros, (self.d_model,), ("mlp",), self.dtype)
    b2 = logical_param(self, "b2", nn.initializers.constant(self.bias_init), (), (), jnp.float32)
    hidden_BTD = nn.gelu(h_BTD.astype(self.dtype) @ w1_DD + b1_D, approximate=True)
    return jax.nn.sigmoid((hidden_BTD @ w2_D).astype(jnp.float32) + b2)


@LMS.register("universal")
class UniversalLM(TransformerLM):
  """Sparse Universal Transformer LM: one shared block, up to L = num_layers applications.

  h_0 = embedding; h_1 = block(h_0); for l = 1 .. L - 1, with alpha_l = gate(h_l):
    p_l = alpha_l prod_{j<l} (1 - alpha_j),  r_l = prod_{j<=l} (1 - alpha_j),
    h_{l+1} = sum_{j<=l} p_j h_j + r_l block(h_l),
  so h_L = sum_{l<L} p_l h_l + r_{L-1} block(h_{L-1}) feeds the head, a mixture with weights
  summing to 1 (`halt_step`, `mix_halted`). A token whose remaining mass r_l falls below
  1 - halt_threshold is halted: its state stays h_l (at inference the block could skip it;
  here every token is computed, the shapes being static). The ACT ponder loss is
  ponder_weight * mean_t E[depth_t], E[depth] = sum_l l p_l + L r_{L-1}, in aux["losses"]
  ("halting/ponder"); metrics "halting/expected_depth" and "halting/compute_fraction" (the
  fraction of token-steps not halted, what a skipping implementation would run).
  With halting=False, h_L = block^L(h_0) (a Universal Transformer of fixed depth).

  The block is `DecoderBlock` with this model's ffn / attention settings (every
  `TransformerLM` field applies; ffn_layers must be None): the "moe" FFN makes it SUT's SMoE,
  a routed attention its mixture of attention heads. Its aux at step l is merged under
  f"layer_{l}/..."; an aux-loss-free MoE bias ("moe_bias") keeps the last step's update.
  Tan et al. 2023, "Sparse Universal Transformer" (stick-breaking halting, ACT loss).
  """

  halting: bool = True
  halt_threshold: float = 0.999
  halt_bias_init: float = 0.0
  ponder_weight: float = 1e-2

  def __post_init__(self):
    if self.ffn_layers is not None:
      raise ValueError(f"universal LM shares one block, so ffn_layers must be None, got "
                       f"{self.ffn_layers}")
    if not 0.0 < self.halt_threshold <= 1.0:
      raise ValueError(f"halt_threshold must be in (0, 1], got {self.halt_threshold}")
    if self.ponder_weight < 0:
      raise ValueError(f"ponder_weight must be >= 0, got {self.ponder_weight}")
    super().__post_init__()

  def _apply_blocks(self, x_BTD: jax.Array, tokens_BT: jax.Array, *,
                    deterministic: bool) -> tuple[jax.Array, Aux]:
    block = self._block(0, name="shared_block")
    inputs = {"token_ids_BT": tokens_BT, "deterministic": deterministic}
    if self.shared_router:
      inputs["router_DE"] = self._shared_router()
    if self.shared_memory_values:
      inputs["values_ND"] = self._shared_values()
    gate = HaltingGate(self.d_model, self.halt_bias_init, self.dtype, name="halting_gate")
    state = start_halting(x_BTD)
    computed_BT = jnp.ones(x_BTD.shape[:2], jnp.float32)
    aux = empty_aux()
    for step in range(self.num_layers):
      halted_BT = None
      if self.halting and step > 0:
        state = halt_step(state, gate(x_BTD), x_BTD, step)
        halted_BT = state.remaining_BT < 1.0 - self.halt_threshold
        computed_BT = computed_BT + (~halted_BT).astype(jnp.float32)
      y_BTD, block_aux = block(x_BTD, **inputs)
      aux = merge_aux(f"layer_{step}", block_aux, aux)
      if halted_BT is None:
        x_BTD = y_BTD
      else:
        x_BTD = jnp.where(halted_BT[..., None], x_BTD, mix_halted(state, y_BTD))
    if not self.halting:
      return x_BTD, aux
    depth_BT = state.depth_BT + self.num_layers * state.remaining_BT
    halting_aux = {
        "losses": {"ponder": self.ponder_weight * jnp.mean(depth_BT)},
        "metrics": {"expected_depth": jnp.mean(depth_BT),
                    "compute_fraction": jnp.mean(computed_BT) / self.num_layers},
    }
    return x_BTD, merge_aux("halting", halting_aux, aux)
