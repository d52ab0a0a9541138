"""Memory layers: product-key memory (pure lookup and read functions, the "pkm" FFN layer).

Importing this package registers the "pkm" layer in `FFNS`.
"""
from sparsejax.memory import layers
from sparsejax.memory import optim
from sparsejax.memory import pkm
from sparsejax.memory.layers import ProductKeyMemory
from sparsejax.memory.optim import make_memory_optimizer, value_lr_labels
from sparsejax.memory.pkm import access_stats, embedding_bag, num_subkeys, pkm_lookup, pkm_read

__all__ = [
    "ProductKeyMemory",
    "access_stats",
    "embedding_bag",
    "layers",
    "make_memory_optimizer",
    "num_subkeys",
    "optim",
    "pkm",
    "pkm_lookup",
    "pkm_read",
    "value_lr_labels",
]
