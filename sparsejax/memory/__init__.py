"""Memory layers: product-key memory, sparse memory finetuning, hashed multi-hot embeddings.

Importing this package registers the "pkm" FFN in `FFNS` and the "hashed" input embedding in
`EMBEDDINGS`.
"""
from sparsejax.memory import finetune
from sparsejax.memory import hashed_embedding
from sparsejax.memory import layers
from sparsejax.memory import optim
from sparsejax.memory import pkm
from sparsejax.memory import row_grad
from sparsejax.memory import sparse_optim
from sparsejax.memory import tfree_head
from sparsejax.memory.finetune import (
    access_counts,
    masks_for,
    read_histograms,
    sparse_update,
    tfidf_scores,
    top_slots,
    window_metrics,
)
from sparsejax.memory.hashed_embedding import HashedEmbedding, hashed_embed, ngram_rows
from sparsejax.memory.layers import ACCESS, ProductKeyMemory
from sparsejax.memory.optim import make_memory_optimizer, value_lr_labels
from sparsejax.memory.row_grad import value_and_row_grad
from sparsejax.memory.tfree_head import TFreeHead, decode_words, tfree_loss, vocab_buckets
from sparsejax.memory.pkm import (
    access_stats,
    embedding_bag,
    histogram_stats,
    num_subkeys,
    pkm_lookup,
    pkm_read,
    slot_histograms,
)

__all__ = [
    "ACCESS",
    "HashedEmbedding",
    "ProductKeyMemory",
    "TFreeHead",
    "access_counts",
    "access_stats",
    "decode_words",
    "embedding_bag",
    "finetune",
    "hashed_embed",
    "hashed_embedding",
    "histogram_stats",
    "layers",
    "make_memory_optimizer",
    "masks_for",
    "ngram_rows",
    "num_subkeys",
    "optim",
    "pkm",
    "pkm_lookup",
    "pkm_read",
    "read_histograms",
    "row_grad",
    "slot_histograms",
    "sparse_optim",
    "sparse_update",
    "tfree_head",
    "tfree_loss",
    "tfidf_scores",
    "top_slots",
    "value_and_row_grad",
    "value_lr_labels",
    "vocab_buckets",
    "window_metrics",
]
