"""An embedding-bag click model (DLRM-style): hashed categorical id bags -> tables -> MLP -> logit.

An example has F categorical fields, each a bag of up to L raw ids (int, -1 marks an empty
slot). Field f hashes its ids into the R_f rows of its own table E_f (R_f x D),

    r(id) = fmix32(id ^ (f + 1) * 0x9E3779B9) mod R_f     (the hashing trick),

and pools its bag into one vector, e_f = sum_l w_l E_f[r(id_l)] with w_l = [id_l >= 0] ("sum")
or that divided by the bag's size ("mean"). The pooled vectors and, with interaction "dot",
their pairwise dot products <e_f, e_g> (f < g) are concatenated and fed to an MLP whose last
layer gives the click logit (C logits in general). The tables hold almost all parameters, so
they are what weight sparsity prunes (`config.sparsity.rules` on the paths "table_<f>").

Shape letters beyond the DESIGN legend: F fields, L ids per bag, R table rows, P = F(F-1)/2
field pairs.

Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and Recommendation
Systems" (embedding bags + MLP, dot interactions); Weinberger et al. 2009, "Feature Hashing for
Large Scale Multitask Learning" (the hashing trick). The sparse-table setting follows Wang et
al. 2024, "Dynamic Sparse Learning: A Novel Paradigm for Efficient Recommendation", and Hwang
et al. 2021, "Centaur: A Chiplet-based, Hybrid Sparse-Dense Accelerator for Personalized
Recommendations".
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux, empty_aux
from sparsejax.memory.hashed_embedding import GOLDEN, fmix32
from sparsejax.memory.pkm import embedding_bag
from sparsejax.models.mlp import ACTIVATIONS, Linear
from sparsejax.registry import MODELS

POOLINGS = ("sum", "mean")
INTERACTIONS = ("concat", "dot")


def hash_rows(ids_BL: jax.Array, num_rows: int, field: int) -> jax.Array:
  """Table rows fmix32(id ^ (field + 1) * 0x9E3779B9) mod num_rows of raw ids (int32 out).

  Ids are read as uint32 (ids below 0 are empty slots: their row is meaningless, weight 0).
  """
  seed = np.uint32(((field + 1) * int(GOLDEN)) & 0xFFFFFFFF)
  return (fmix32(ids_BL.astype(jnp.uint32) ^ seed) % np.uint32(num_rows)).astype(jnp.int32)


def bag_weights(ids_BL: jax.Array, pooling: str) -> jax.Array:
  """w_BL = [id >= 0] ("sum"), divided by the bag's size ("mean"; an empty bag pools to 0)."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}; allowed: {', '.join(POOLINGS)}")
  present_BL = (ids_BL >= 0).astype(jnp.float32)
  if pooling == "sum":
    return present_BL
  return present_BL / jnp.maximum(jnp.sum(present_BL, axis=-1, keepdims=True), 1.0)


def pool_fields(tables: Sequence[jax.Array], ids_BFL: jax.Array, pooling: str = "mean"
                ) -> jax.Array:
  """e_BFD: field f's bag pooled from its own table, e_f = sum_l w_l E_f[hash_f(id_l)]."""
  if ids_BFL.ndim != 3 or ids_BFL.shape[1] != len(tables):
    raise ValueError(f"ids must be (batch, fields={len(tables)}, bag), got {ids_BFL.shape}")
  weights_BFL = bag_weights(ids_BFL, pooling)
  pooled = [embedding_bag(t_RD, hash_rows(ids_BFL[:, f], t_RD.shape[0], f), weights_BFL[:, f])
            for f, t_RD in enumerate(tables)]
  return jnp.stack(pooled, axis=1)


def dot_interactions(e_BFD: jax.Array) -> jax.Array:
  """z_BP = <e_f, e_g> for every field pair f < g, in row-major (f, g) order."""
  gram_BFF = jnp.einsum("bfd,bgd->bfg", e_BFD, e_BFD)
  upper_f, upper_g = np.triu_indices(e_BFD.shape[1], k=1)
  return gram_BFF[:, upper_f, upper_g]


@MODELS.register("dlrm")
class DLRM(nn.Module):
  """Click logits from hashed categorical id bags: tables -> bag pooling -> interaction -> MLP.

  x = [e_1, ..., e_F] (+ [<e_f, e_g>]_{f<g} with interaction "dot");
  h_{l+1} = act(h_l W_l + b_l); logits_BC = h_L W_head + b_head.
  Tables "table_<f>" (R_f x D, N(0, 1/D) init, logical axes ("vocab", "embed")); MLP layers
  "layer_<i>" and "head" as in `sparsejax.models.MLP`. Takes ids (B, F, L), -1 = empty slot;
  F comes from the input.
  Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and
  Recommendation Systems".

  Attributes:
    num_classes: C, logits per example (1 for a click).
    num_rows: R, rows per table: an int for every field, or one per field (then F must match
      the input's field count F, read from the ids).
    embed_dim: D, the table width.
    hidden: the MLP's hidden widths.
    pooling: "sum" | "mean" over a bag.
    interaction: "concat" (pooled vectors only) | "dot" (plus pairwise dot products).
    activation: "relu" | "gelu" | "tanh".
    dtype: compute dtype (params stay float32).
  """

  num_classes: int
  num_rows: int | Sequence[int] = 4096
  embed_dim: int = 16
  hidden: Sequence[int] = (64, 32)
  pooling: str = "mean"
  interaction: str = "dot"
  activation: str = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids_BFL: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    rows = self._rows(ids_BFL.shape[1])
    tables = [self.param(f"table_{f}", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.embed_dim**-0.5), ("vocab", "embed")),
                         (r, self.embed_dim), jnp.float32) for f, r in enumerate(rows)]
    e_BFD = pool_fields([t.astype(self.dtype) for t in tables], ids_BFL, self.pooling)
    h = e_BFD.reshape(e_BFD.shape[0], -1)
    if self.interaction == "dot":
      h = jnp.concatenate([h, dot_interactions(e_BFD)], axis=-1)
    act = ACTIVATIONS[self.activation]
    for i, width in enumerate(self.hidden):
      h = act(Linear(int(width), "mlp", self.dtype, name=f"layer_{i}")(h))
    return Linear(self.num_classes, "vocab", self.dtype, name="head")(h), empty_aux()

  def _rows(self, num_fields: int) -> tuple[int, ...]:
    """Rows per table, after checking the settings against the input's field count."""
    rows = ((self.num_rows,) * num_fields if isinstance(self.num_rows, int)
            else tuple(int(r) for r in self.num_rows))
    if len(rows) != num_fields or min(rows, default=0) < 1:
      raise ValueError(f"DLRM num_rows={self.num_rows} must be a positive int or one per field "
                       f"of the input's {num_fields}")
    if self.interaction not in INTERACTIONS:
      raise ValueError(f"DLRM interaction={self.interaction!r}; allowed: "
                       f"{', '.join(INTERACTIONS)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"DLRM activation={self.activation!r}; allowed: "
                       f"{', '.join(sorted(ACTIVATIONS))}")
    return rows
