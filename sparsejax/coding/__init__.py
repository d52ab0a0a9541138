"""Sparse coding layers: unrolled ISTA / IHT (LISTA), top-k bottlenecks, sparse embeddings,
entmax Hopfield retrieval.

Importing the package registers its layers in `sparsejax.registry`.
"""
