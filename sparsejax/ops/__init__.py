"""Small sparse ops shared by several families (SAEs, activation sparsity, attention).

`gather_decode` is the embedding-bag decode of k selected rows per token; its cost follows k, not
the table size, in the forward and the backward pass.
"""
from sparsejax.ops.gather import gather_decode  # noqa: F401
