"""Causal self-attention whose probabilities are alpha-entmax, sparsemax or softmax of the scores.

With alpha > 1, entmax gives exactly zero weight to keys scoring below a per-query threshold, so
each query attends to a data-dependent subset of its causal keys; a learned alpha per head moves
each head between softmax-like (alpha -> 1) and sparsemax (alpha = 2) behaviour.

Shape letters beyond the DESIGN legend: K is the per-head dim (d_model / num_heads) and S the
key positions (the same T tokens, seen as keys).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.models.layers import check_attention_fields, logical_param, project_out, project_qkv
from sparsejax.ops.entmax import DEFAULT_BISECT_ITERS, entmax_bisect, sparsemax
from sparsejax.registry import ATTENTIONS
from sparsejax.sites import Site

NORMALIZERS = ("entmax", "sparsemax", "softmax")
# alpha = clip(1 + sigmoid(a), ALPHA_MIN, 2): Correia et al.'s range, away from alpha = 1 where
# the float32 bisection and the alpha gradient lose precision.
ALPHA_MIN = 1.01


def causal_scores(q_BTHK: jax.Array, k_BTHK: jax.Array) -> jax.Array:
  """Scaled dot-product scores with the future masked: s_bhts = <q_bth, k_bsh> / sqrt(K), -inf
  for s > t.

  Vaswani et al. 2017, "Attention Is All You Need".
  """
  seq_len, head_dim = q_BTHK.shape[1], q_BTHK.shape[-1]
  scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK) * head_dim**-0.5
  causal_TS = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  return jnp.where(causal_TS, scores_BHTS, -jnp.inf)


def head_alpha(alpha_logit_H: jax.Array) -> jax.Array:
  """The entmax alpha of each head from its unconstrained logit a: clip(1 + sigmoid(a), 1.01, 2).

  Correia, Niculae & Martins 2019, "Adaptively Sparse Transformers".
  """
  return jnp.clip(1 + jax.nn.sigmoid(alpha_logit_H), ALPHA_MIN, 2.0)


def attention_probs(
    scores_BHTS: jax.Array,
    normalizer: str,
    alpha_H: jax.Array | None = None,
    n_iter: int = DEFAULT_BISECT_ITERS,
) -> jax.Array:
  """Each query's distribution over keys: softmax, sparsemax or alpha_h-entmax of its scores.

  p_bht = normalizer(s_bht) over the key axis S; "entmax" uses head h's alpha_H[h] (bisection,
  `n_iter` steps), "sparsemax" is alpha = 2, "softmax" the alpha -> 1 limit. -inf scores
  (masked keys) get exactly zero probability.
  Martins & Astudillo 2016, "From Softmax to Sparsemax"; Peters, Niculae & Martins 2019,
  "Sparse Sequence-to-Sequence Models"; Correia, Niculae & Martins 2019, "Adaptively Sparse
  Transformers".
  """
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer={normalizer!r}; allowed: {', '.join(NORMALIZERS)}")
  if normalizer == "softmax":
    return jax.nn.softmax(scores_BHTS, axis=-1)
  if normalizer == "sparsemax":
    return sparsemax(scores_BHTS, axis=-1)
  if alpha_H is None:
    raise ValueError("alpha_H=None; normalizer='entmax' needs one alpha per head")
  return entmax_bisect(scores_BHTS, alpha_H[:, None], axis=-1, n_iter=n_iter)


def attended_fraction(probs_BHTS: jax.Array) -> jax.Array:
  """Mean over batch, heads and queries of the fraction of causal keys with nonzero probability:
  mean_{b,h,t} |{s <= t : p_bhts > 0}| / (t + 1)."""
  seq_len = probs_BHTS.shape[-1]
  nonzero_BHT = jnp.sum(probs_BHTS > 0, axis=-1)
  return jnp.mean(nonzero_BHT / jnp.arange(1, seq_len + 1))


@ATTENTIONS.register("entmax")
class EntmaxAttention(nn.Module):
  """Multi-head causal self-attention with entmax, sparsemax or softmax probabilities.

  q, k, v = x W_q, x W_k, x W_v with W_*: D -> H x K, K = D / H (RoPE on q and k when
  positions == "rope"); o_h = normalizer(q_h k_h^T / sqrt(K) + M) v_h with M_ts = -inf for
  s > t; y = concat_h(o_h) W_o. Same params as `CausalSelfAttention` (wq, wk, wv, wo), plus for
  normalizer "entmax" the param "alpha" of shape (H,), the logits a of the per-head
  alpha_h = clip(1 + sigmoid(a_h), 1.01, 2), initialised to a = 0 (alpha = 1.5). "sparsemax" is
  alpha = 2 for every head, "softmax" equals `CausalSelfAttention`. `n_iter` bisection steps find
  the entmax threshold. aux metrics: "attended_fraction" (mean fraction of causal keys with
  nonzero probability) and "alpha" (H,) (1 for softmax). No dropout: `deterministic` is accepted
  for the layer contract. Site (`sparsejax.sites`) "heads": o_BTHK, the per-head outputs before
  W_o.
  Correia, Niculae & Martins 2019, "Adaptively Sparse Transformers"; Peters, Niculae & Martins
  2019, "Sparse Sequence-to-Sequence Models".
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  dtype: Any = jnp.float32
  rope_max_wavelength: float = 10_000.0
  normalizer: str = "entmax"
  n_iter: int = DEFAULT_BISECT_ITERS

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    self._check_fields()
    q_BTHK, k_BTHK, v_BTHK = project_qkv(self, x_BTD)
    alpha_H = self._alpha()
    probs_BHTS = attention_probs(
        causal_scores(q_BTHK, k_BTHK), self.normalizer, alpha_H, self.n_iter
    )
    o_BTHK = Site(name="heads")(jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BTHK))
    metrics = {
        "attended_fraction": attended_fraction(probs_BHTS),
        "alpha": alpha_H.astype(jnp.float32),
    }
    return project_out(self, o_BTHK), {"losses": {}, "metrics": metrics}

  def _check_fields(self) -> None:
    check_attention_fields(self.d_model, self.num_heads, self.positions)
    if self.normalizer not in NORMALIZERS:
      raise ValueError(f"normalizer={self.normalizer!r}; allowed: {', '.join(NORMALIZERS)}")

  def _alpha(self) -> jax.Array:
    """alpha per head (H,): learned for "entmax", 2 for "sparsemax", 1 for "softmax"."""
    if self.normalizer == "entmax":
      logit_H = logical_param(
          self, "alpha", nn.initializers.zeros, (self.num_heads,), ("heads",), jnp.float32
      )
      return head_alpha(logit_H)
    return jnp.full((self.num_heads,), 2.0 if self.normalizer == "sparsemax" else 1.0)
