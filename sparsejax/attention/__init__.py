"""Sparse attention: which keys a query sees.

Importing this package registers its attention layers in `sparsejax.registry.ATTENTIONS`:
"entmax" (alpha-entmax / sparsemax attention probabilities, `sparsejax.attention.entmax`),
"routing" (Routing Transformer attention, k-means centroids as explicit state,
`sparsejax.attention.routing`) and "block_sparse" (a fixed pattern of
`sparsejax.attention.patterns` run by the block-sparse attention of
`kernels.block_sparse_attention`, `sparsejax.attention.block_sparse`). Patterns (causal,
window, chunked, strided, fixed, global tokens, random blocks, BigBird, per-head MoA spans,
top-k blocks from pooled scores) compose with `|` and `&`; `sparsejax.attention.dynamic`
searches per-head block patterns to a target recall (AdaSpa) and caches them across steps
(SparseD).
"""
from sparsejax.attention import block_sparse
from sparsejax.attention import dynamic
from sparsejax.attention import entmax
from sparsejax.attention import patterns
from sparsejax.attention import routing
from sparsejax.attention.block_sparse import PATTERNS
from sparsejax.attention.block_sparse import BlockSparseAttention
from sparsejax.attention.block_sparse import layout_attended_fraction
from sparsejax.attention.entmax import (
    NORMALIZERS,
    EntmaxAttention,
    attended_fraction,
    attention_probs,
    causal_scores,
    head_alpha,
)
from sparsejax.attention.patterns import Pattern
from sparsejax.attention.routing import RoutingAttention, routing_attention
