"""The product-key memory FFN as a thin Flax Linen module over `sparsejax.memory.pkm`."""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.memory import pkm
from sparsejax.models.layers import logical_param
from sparsejax.registry import FFNS

QUERY_NORMS = ("layernorm", "rmsnorm", "none")
# Param names; `sparsejax.memory.optim` finds value tables by them.
VALUES = "values"
SUBKEYS = "subkeys"
# The model-level param holding one value table shared by every memory layer
# (`TransformerLM(shared_memory_values=True)`).
SHARED_VALUES = "shared_memory_values"
# Variable collection the layer sows its reads into when the caller makes it mutable: "idx" and
# "weights", each a tuple of (T, H, K) arrays (see `sparsejax.memory.finetune.access_counts`).
ACCESS = "memory_access"
# Variable collection through which the value table's gradient leaves in row form: when the
# caller makes it mutable, the layer reads the table without gradient and adds to the gathered
# rows a zero variable "rows" ((T, H k, D), created if absent), so d loss / d rows is the
# gradient of every row read (see `sparsejax.memory.row_grad`).
VALUE_ROWS = "memory_value_rows"
# The mesh axis that the "memory" logical axis (value-table rows) maps to in `sparsejax.sharding`.
MEMORY_MESH_AXIS = "model"


@FFNS.register("pkm")
class ProductKeyMemory(nn.Module):
  """Product-key memory layer: y = m(norm(x W_q)), or the gated memory+ output.

  Per token and head h: q_h = norm(x W_q[:, h]) (Q-dim, LayerNorm / RMSNorm per head in place of
  the paper's BatchNorm); the top-k of N = num_keys^2 product keys (`pkm.pkm_lookup`) and the
  softmax of their scores weight k rows of one N x D value table shared by all heads;
  m(x) = sum_h sum_k w_hk V[idx_hk] (`pkm.pkm_read`). With `gated` (memory+),
  y = (m(x) * silu(x W_1)) W_2 with W_1, W_2: D x D; else y = m(x). The value table is annotated
  ("memory", "embed"), so it shards over the `model` mesh axis; sub-keys and the query
  projection are replicated (except `embed` over `fsdp`). It has no hidden width, so it declares
  no `d_ff` (the model passes none). No dropout: `deterministic` is accepted for the layer
  contract.

  Metrics (float32 scalars, see `pkm.access_stats`): memory_usage (fraction of slots read by the
  batch), access_entropy (of the weight mass over slots, / log N), top_slot_share. When the
  caller makes the `ACCESS` ("memory_access") collection mutable, the layer also sows its slot
  indices and weights there ("idx", "weights": (T, H, K)), for eval-window telemetry and for
  sparse memory finetuning; otherwise nothing is stored.

  Shared values: called with `values_ND` (an N x D table owned by the model, created by
  `values_param`), the layer reads that table and creates no `values` param of its own, so
  several layers (each with its own query projection and sub-keys) share one memory pool and
  the table's gradient is the sum of their contributions.

  Row-form value gradient: when the caller makes the `VALUE_ROWS` ("memory_value_rows")
  collection mutable, the table is read under stop_gradient and a zero variable "rows" of the
  gathered rows' shape (T, H k, D) is added to them, so the table gets no gradient and
  d loss / d rows holds the gradient of each row read (at the slots sown in `ACCESS`);
  `sparsejax.memory.row_grad.value_and_row_grad` builds the table's (idx, rows) gradient from it
  without an N x D buffer. Call the layer once per apply in that mode.
  Lample et al. 2019, "Large Memory Layers with Product Keys"; Berges et al. 2024, "Memory
  Layers at Scale" (memory+ gating, query normalisation, a memory pool shared across layers).

  Attributes:
    d_model: D, also the value dim.
    num_keys: P, sub-keys per product half; the memory has N = P^2 slots.
    k: slots read per token and head, 1 <= k <= num_keys.
    num_heads: H, memory heads, each with its own query projection and sub-keys.
    d_key: Q, query dim per head (even; each product half has Q / 2).
    query_norm: "layernorm", "rmsnorm" or "none", applied per head over Q.
    gated: the memory+ SiLU-gated output projection.
    dtype: compute dtype of the projections and the output; params, lookup scores, softmax
      weights and the value read are float32.
  """

  d_model: int
  num_keys: int = 128
  k: int = 32
  num_heads: int = 4
  d_key: int = 128
  query_norm: str = "layernorm"
  gated: bool = False
  dtype: Any = jnp.float32

  # `TransformerLM(shared_memory_values=True)` may pass one model-level table to every layer.
  shares_values: ClassVar[bool] = True

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  @property
  def memory_size(self) -> int:
    """N = num_keys^2, the number of memory slots."""
    return self.num_keys**2

  @nn.compact
  def __call__(
      self, x_BTD: jax.Array, *, values_ND: jax.Array | None = None, deterministic: bool = True
  ) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    batch, length, d_model = x_BTD.shape
    x_TD = x_BTD.reshape(batch * length, d_model).astype(self.dtype)
    query_THQ = self._normalize(self._query(x_TD))
    keys_H2PA = self.param(
        SUBKEYS,
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=(self.d_key // 2) ** -0.5), (None, None, None, "kv")
        ),
        (self.num_heads, 2, self.num_keys, self.d_key // 2),
        jnp.float32,
    )
    if values_ND is None:
      values_ND = self.values_param(self, VALUES)
    elif values_ND.shape != (self.memory_size, self.d_model):
      raise ValueError(
          f"values_ND must have shape (num_keys^2, d_model) = {(self.memory_size, self.d_model)},"
          f" got {values_ND.shape}"
      )
    rows_delta_TRD = None
    if self.is_mutable_collection(VALUE_ROWS) and not self.is_initializing():
      values_ND = jax.lax.stop_gradient(values_ND)
      shape = (x_TD.shape[0], self.num_heads * self.k, values_ND.shape[1])
      rows_delta_TRD = self.variable(VALUE_ROWS, "rows", jnp.zeros, shape, values_ND.dtype).value
    # The table stays float32 (casting all N rows would cost O(N D)); only the read is cast.
    y_TD, idx_THK, weights_THK = pkm.pkm_read(query_THQ, keys_H2PA, values_ND, self.k,
                                              rows_delta_TRD)
    y_TD = y_TD.astype(self.dtype)
    if self.gated:
      gate_TD = nn.silu(x_TD @ self._weight("w1", ("embed", "mlp")))
      y_TD = (y_TD * gate_TD) @ self._weight("w2", ("mlp", "embed"))
    if not self.is_initializing():  # `init` makes every collection mutable; keep it out of state.
      self.sow(ACCESS, "idx", idx_THK)  # No-ops unless the caller made ACCESS mutable.
      self.sow(ACCESS, "weights", weights_THK)
    metrics = pkm.access_stats(idx_THK, weights_THK, self.memory_size)
    return y_TD.reshape(batch, length, d_model), {"losses": {}, "metrics": metrics}

  def values_param(self, owner: nn.Module, name: str) -> jax.Array:
    """The N x D float32 value table as param `name` of `owner` (this layer, or a model)."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else dict(mesh.shape).get(MEMORY_MESH_AXIS, 1)
    if self.memory_size % shards:
      raise ValueError(
          f"memory_size={self.memory_size} (num_keys={self.num_keys} squared) is not divisible by "
          f"the mesh's {MEMORY_MESH_AXIS!r} axis (size {shards}), which shards the value table's "
          f"rows; use a num_keys whose square is a multiple of {shards}"
      )
    return owner.param(
        name,
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=self.d_model**-0.5), ("memory", "embed")
        ),
        (self.memory_size, self.d_model),
        jnp.float32,
    )

  def _validate(self) -> None:
    """One-line ValueErrors for inconsistent fields, raised when the module is built."""
    for field in ("d_model", "num_keys", "num_heads", "d_key"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
    pkm.check_top_k(self.k, self.num_keys)
    if self.d_key % 2:
      raise ValueError(f"d_key={self.d_key} must be even (it is split into two product halves)")
    if self.query_norm not in QUERY_NORMS:
      raise ValueError(f"query_norm={self.query_norm!r}; allowed: {', '.join(QUERY_NORMS)}")

  def _query(self, x_TD: jax.Array) -> jax.Array:
    """q = x W_q with W_q: D x H x Q."""
    w_DHQ = logical_param(
        self,
        "query",
        nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
        (self.d_model, self.num_heads, self.d_key),
        ("embed", None, "kv"),
        self.dtype,
    )
    return jnp.einsum("td,dhq->thq", x_TD, w_DHQ)

  def _normalize(self, query_THQ: jax.Array) -> jax.Array:
    """`query_norm` over Q, with a learned (H, Q) scale (and bias for layernorm)."""
    if self.query_norm == "none":
      return query_THQ
    ones = nn.with_logical_partitioning(nn.initializers.ones, (None, "kv"))
    if self.query_norm == "rmsnorm":
      norm = nn.RMSNorm(
          epsilon=1e-6, dtype=self.dtype, feature_axes=(-2, -1), scale_init=ones,
          name="query_norm",
      )
    else:
      zeros = nn.with_logical_partitioning(nn.initializers.zeros, (None, "kv"))
      norm = nn.LayerNorm(
          epsilon=1e-6, dtype=self.dtype, feature_axes=(-2, -1), scale_init=ones,
          bias_init=zeros, name="query_norm",
      )
    return norm(query_THQ)

  def _weight(self, name: str, logical_axes: tuple[str, str]) -> jax.Array:
    """A D x D memory+ projection."""
    return logical_param(
        self, name, nn.initializers.lecun_normal(), (self.d_model, self.d_model), logical_axes,
        self.dtype,
    )
