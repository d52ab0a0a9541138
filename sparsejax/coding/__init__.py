"""Sparse coding layers: unrolled ISTA / IHT (LISTA), top-k bottlenecks, sparse embeddings,
entmax Hopfield retrieval.

The layers are standalone Flax Linen modules, each returning `(output, aux)`; none is in a
`sparsejax.registry` registry, because none fits the LM contracts there (they do not map x_BTD to
y_BTD of the same width, or need inputs the model does not pass):
  LISTA               y_BD -> codes z_BN (lista.py)
  TopKBottleneck      x_BN -> k-sparse z_BN, straight-through or Gumbel top-k (bottleneck.py)
  BinarisedEmbedding  x_BD -> k-hot codes in N >> D units, or their k indices (embeddings.py)
  SparseHopfield      queries xi_QD -> retrieved patterns from stored or learned memories
                      (hopfield.py)
"""
from sparsejax.coding.bottleneck import (
    TopKBottleneck,
    gumbel_top_k,
    indices_to_mask,
    relaxed_top_k_mask,
    straight_through_top_k,
    top_k_mask,
)
from sparsejax.coding.embeddings import (
    BinarisedEmbedding,
    binary_code,
    code_indices,
    code_overlap,
)
from sparsejax.coding.hopfield import SparseHopfield, entmax_weights, hopfield_retrieve
from sparsejax.coding.lista import (
    LISTA,
    PENALTIES,
    half_threshold,
    hard_threshold,
    ista,
    lipschitz_step,
    lista_apply,
    lista_params,
    random_dictionary,
    soft_threshold,
)

__all__ = [
    "BinarisedEmbedding",
    "LISTA",
    "PENALTIES",
    "SparseHopfield",
    "TopKBottleneck",
    "binary_code",
    "code_indices",
    "code_overlap",
    "entmax_weights",
    "gumbel_top_k",
    "half_threshold",
    "hard_threshold",
    "hopfield_retrieve",
    "indices_to_mask",
    "ista",
    "lipschitz_step",
    "lista_apply",
    "lista_params",
    "random_dictionary",
    "relaxed_top_k_mask",
    "soft_threshold",
    "straight_through_top_k",
    "top_k_mask",
]
