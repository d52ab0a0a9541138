"""Pallas kernels; each kernel file keeps its pure-jnp reference beside it.

None are published yet: the grouped and block-sparse matmuls land here next.
"""
