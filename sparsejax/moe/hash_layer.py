"""Hash layers: the MoE FFN routed by a fixed token-id -> expert table instead of a router."""
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.moe import balance
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing
from sparsejax.moe.layers import MoE, fields_off_default
from sparsejax.registry import FFNS

HASH_TABLES = ("random", "balanced")
# MoE fields that configure a learned router; a hash layer has none, so they keep their defaults.
ROUTER_FIELDS = ("k", "router", "router_kwargs", "jitter", "bias_update_rate",
                 "load_balance_weight", "importance_weight", "z_loss_weight")


@FFNS.register("hash_moe")
class HashMoE(MoE, kw_only=True):
  """Hash-routed experts: y_t = FFN_{h(id_t)}(x_t) (+ shared experts' FFN(x_t)), gate 1.

  h: [V] -> [0, E) is a static table built at trace time: "random" draws h(v) uniformly
  (`routing.make_hash_table` with `seed`); "balanced" packs ids by their unigram frequency so
  that expected expert loads are even (`routing.make_balanced_hash_table`). There are no router
  params and no balancing loss; experts, capacity and shared experts are the MoE layer's (same
  param names, so `sparsejax.moe.upcycle` applies). Token ids must lie in [0, V). Roller et al.,
  2021, "Hash Layers For Large Sparse Models".

  Attributes (beyond MoE's expert, capacity, shared-expert and dtype fields):
    vocab_size: V. In a `TransformerLM` the model passes its own (see `takes_token_ids`).
    hash_table: "random" or "balanced".
    token_frequencies: a non-negative weight per token id (length V); required for
      "balanced", unused by "random". Configs may write "train", which the trainer replaces
      with the training split's unigram frequencies before building the model.
    seed: seed of the "random" table.
  MoE's router fields (`ROUTER_FIELDS`: k, router, router_kwargs, ...) must keep their defaults.
  """
  takes_token_ids: ClassVar[bool] = True
  shares_router: ClassVar[bool] = False
  vocab_size: int
  hash_table: str = "random"
  token_frequencies: tuple[float, ...] | None = None
  seed: int = 0
  k: int = 1
  load_balance_weight: float = 0.0
  z_loss_weight: float = 0.0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, token_ids_BT: jax.Array, deterministic: bool = True):
    """Returns (y_BTD, {"losses": {}, "metrics": {name: array}}), metrics as `_load_metrics`."""
    del deterministic  # Hash routing has no training-only behaviour.
    self._validate()
    batch, length, d_model = x_BTD.shape
    if token_ids_BT.shape != (batch, length):
      raise ValueError(f"token_ids_BT must have shape {(batch, length)} (x_BTD's B, T), got "
                       f"{token_ids_BT.shape}")
    x_TD = x_BTD.reshape(batch * length, d_model).astype(self.dtype)
    routed, _ = routing.route_hash(token_ids_BT.reshape(-1), table_V=jnp.asarray(self.table_V()),
                                   num_experts=self.num_experts)
    plan = self._limit_capacity(routed)
    y_TD = self._run_experts(x_TD, plan)
    if self.num_shared_experts:
      y_TD = y_TD + self._shared_experts(x_TD)
    aux = {"losses": {}, "metrics": _load_metrics(routed, plan)}
    return y_TD.reshape(batch, length, d_model), aux

  def table_V(self) -> np.ndarray:
    """h: the expert of each token id, int32 `[V]`, a constant of the trace."""
    if self.hash_table == "random":
      return routing.make_hash_table(self.vocab_size, self.num_experts, self.seed)
    return routing.make_balanced_hash_table(np.asarray(self.token_frequencies), self.num_experts)

  def _validate(self) -> None:
    changed = sorted(fields_off_default(self, ROUTER_FIELDS))
    if changed:
      raise ValueError(f"hash_moe routes by a fixed table and has no learned router; remove "
                       f"{changed} (allowed only at their defaults)")
    super()._validate()
    vocab = self.vocab_size
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
      raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
    if self.hash_table not in HASH_TABLES:
      raise ValueError(f"hash_table must be one of {HASH_TABLES}, got {self.hash_table!r}")
    if self.token_frequencies is not None:
      self._check_frequencies()
    elif self.hash_table == "balanced":
      raise ValueError("hash_table='balanced' needs token_frequencies (one weight per token id)")

  def _check_frequencies(self) -> None:
    if isinstance(self.token_frequencies, str):
      raise ValueError(f"token_frequencies={self.token_frequencies!r} must be replaced by one "
                       f"weight per token id before the model is built (the trainer replaces "
                       f"'train' with the training split's unigram frequencies)")
    freqs_V = np.asarray(self.token_frequencies, np.float64)
    if freqs_V.shape != (self.vocab_size,) or not np.all(freqs_V >= 0):
      raise ValueError(f"token_frequencies must be {self.vocab_size} (vocab_size) non-negative "
                       f"numbers, got shape {freqs_V.shape}")


def _load_metrics(routed: plan_lib.DispatchPlan,
                 plan: plan_lib.DispatchPlan) -> dict[str, jax.Array]:
  """Expert load f_e of the routed plan, max_e f_e * E, and the fraction capacity dropped."""
  fraction_E = balance.expert_fraction(routed)
  routed_pairs = jnp.sum(routed.keep_TK)
  dropped_pairs = routed_pairs - jnp.sum(plan.keep_TK)
  return {
      "expert_load_E": fraction_E,
      "load_max_over_mean": jnp.max(fraction_E) * routed.num_experts,
      "dropped_fraction": dropped_pairs / jnp.maximum(routed_pairs, 1),
  }
