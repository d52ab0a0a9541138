"""Small sparse ops shared by several families (SAEs, activation sparsity, attention).

`gather_decode` is the embedding-bag decode of k selected rows per token; its cost follows k, not
the table size, in the forward and the backward pass. `topk_encode` is the matching TopK encoder:
a dense score matmul, then a backward pass that touches only the k chosen latents per token.
`sparsemax`, `entmax15` and `entmax_bisect` are the sparse normalisers (exact gradients; alpha
learnable) shared by entmax attention and anything else that needs sparse probabilities.
"""
from sparsejax.ops.gather import (  # noqa: F401
    gather_decode, gather_rows_dot, gather_rows_sum, scatter_rows_add)
from sparsejax.ops.topk import top_k_blocked, topk_encode  # noqa: F401
from sparsejax.ops.entmax import entmax15, entmax_bisect, sparsemax  # noqa: F401
