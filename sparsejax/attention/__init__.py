"""Sparse attention: which keys a query sees.

Importing this package registers its attention layers in `sparsejax.registry.ATTENTIONS`:
"entmax" (alpha-entmax / sparsemax attention probabilities, `sparsejax.attention.entmax`).
"""
from sparsejax.attention import entmax
from sparsejax.attention.entmax import (
    NORMALIZERS,
    EntmaxAttention,
    attended_fraction,
    attention_probs,
    causal_scores,
    head_alpha,
)
