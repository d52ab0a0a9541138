"""Hash layers: the MoE FFN routed by a fixed token-id -> expert table instead of a router."""
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.moe import core
from sparsejax.moe import experts
from sparsejax.moe import routing
from sparsejax.moe.layers import ffn_expert_fn
from sparsejax.moe.layers import ffn_params
from sparsejax.registry import FFNS

HASH_TABLES = ("random", "balanced")


def route_token_ids(params: core.Params, x_TD: jax.Array, bias_E: jax.Array | None, *,
                    token_ids_T: jax.Array, table_V: jax.Array, num_experts: int
                    ) -> core.Routing:
  """The `core.RouterFn` of hash layers: token t to expert table_V[id_t], gate 1, no logits.

  Reads neither params nor x, and takes no selection bias (`routing.route_hash`).
  """
  del params, x_TD, bias_E  # The table alone routes.
  plan, aux = routing.route_hash(token_ids_T, table_V=table_V, num_experts=num_experts)
  return core.Routing(plan, None, aux)


@FFNS.register("hash_moe")
class HashMoE(nn.Module):
  """Hash-routed experts: y_t = FFN_{h(id_t)}(x_t) (+ shared experts' FFN(x_t)), gate 1.

  h: [V] -> [0, E) is a static table built at trace time: "random" draws h(v) uniformly
  (`routing.make_hash_table` with `seed`); "balanced" packs ids by their unigram frequency so
  that expected expert loads are even (`routing.make_balanced_hash_table`). `core.moe_apply`
  with the router function `route_token_ids` and the MoE layer's expert function
  `core.ffn_experts`: no router params, no balancing loss, capacity dropping by position; the
  expert params are the MoE layer's (same names, so `sparsejax.moe.upcycle` applies). Token
  ids must lie in [0, V). Roller et al., 2021, "Hash Layers For Large Sparse Models".

  Attributes:
    d_model: D. d_ff: F, hidden size of each expert (and of each shared expert).
    vocab_size: V. In a `TransformerLM` the model passes its own (see `takes_token_ids`).
    num_experts: E.
    hash_table: "random" or "balanced".
    token_frequencies: a non-negative weight per token id (length V); required for
      "balanced", unused by "random". Configs may write "train", which the trainer replaces
      with the training split's unigram frequencies before building the model.
    seed: seed of the "random" table.
    capacity_factor, capacity_multiple, expert, num_shared_experts, implementation, tile,
      expert_parallel, ep_buffer_factor, ep_num_chunks, ep_exchange, dtype, param_dtype: as
      the MoE layer's.
  """
  takes_token_ids: ClassVar[bool] = True
  d_model: int
  d_ff: int
  vocab_size: int
  num_experts: int = 8
  hash_table: str = "random"
  token_frequencies: tuple[float, ...] | None = None
  seed: int = 0
  capacity_factor: float | None = None
  capacity_multiple: int = 1
  expert: str = "swiglu"
  num_shared_experts: int = 0
  implementation: str = "auto"
  tile: int = 128
  expert_parallel: bool | str = "auto"
  ep_buffer_factor: float | None = None
  ep_num_chunks: int = 1
  ep_exchange: str = "all_to_all"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    vocab = self.vocab_size
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
      raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
    if self.hash_table not in HASH_TABLES:
      raise ValueError(f"hash_table must be one of {HASH_TABLES}, got {self.hash_table!r}")
    if self.token_frequencies is not None:
      self._check_frequencies()
    elif self.hash_table == "balanced":
      raise ValueError("hash_table='balanced' needs token_frequencies (one weight per token id)")
    experts.check_expert_kind(self.expert)
    core.check_capacity_settings(self.capacity_factor, "position")
    core.check_expert_parallel_settings(self.expert_parallel, self.ep_buffer_factor,
                                        self.ep_num_chunks, self.ep_exchange)
    super().__post_init__()

  def _check_frequencies(self) -> None:
    if isinstance(self.token_frequencies, str):
      raise ValueError(f"token_frequencies={self.token_frequencies!r} must be replaced by one "
                       f"weight per token id before the model is built (the trainer replaces "
                       f"'train' with the training split's unigram frequencies)")
    freqs_V = np.asarray(self.token_frequencies, np.float64)
    if freqs_V.shape != (self.vocab_size,) or not np.all(freqs_V >= 0):
      raise ValueError(f"token_frequencies must be {self.vocab_size} (vocab_size) non-negative "
                       f"numbers, got shape {freqs_V.shape}")

  def table_V(self) -> np.ndarray:
    """h: the expert of each token id, int32 `[V]`, a constant of the trace."""
    if self.hash_table == "random":
      return routing.make_hash_table(self.vocab_size, self.num_experts, self.seed)
    return routing.make_balanced_hash_table(np.asarray(self.token_frequencies), self.num_experts)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, token_ids_BT: jax.Array, *,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    """Returns (y_BTD, {"losses": {}, "metrics": {name: array}}), metrics as `core.moe_aux`."""
    del deterministic  # Hash routing has no training-only behaviour.
    batch, length, d_model = x_BTD.shape
    if token_ids_BT.shape != (batch, length):
      raise ValueError(f"token_ids_BT must have shape {(batch, length)} (x_BTD's B, T), got "
                       f"{token_ids_BT.shape}")
    router_fn = functools.partial(route_token_ids, token_ids_T=token_ids_BT.reshape(-1),
                                  table_V=jnp.asarray(self.table_V()),
                                  num_experts=self.num_experts)
    y_TD, aux, _ = core.moe_apply(
        ffn_params(self), x_BTD.reshape(batch * length, d_model), router_fn=router_fn,
        expert_fn=ffn_expert_fn(self, pairs_per_token=1), capacity_factor=self.capacity_factor,
        capacity_multiple=self.capacity_multiple)
    return y_TD.reshape(x_BTD.shape), aux
