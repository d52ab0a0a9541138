"""Polar Sparsity head routing: a router picks the k attention heads a whole batch runs.

At every position t the router scores each head from the token, s_bth = x_bt W_r, and the k
heads of largest batch-mean score sbar_th = mean_b s_bth run for every sequence of the batch;
the other heads' outputs are zero. The selection at t uses only tokens at position t, so the
layer stays causal; in a batched decode step (one position) all sequences share the k heads,
so the step reads only those heads' slices of W_q, W_k, W_v and W_o (`head_routed_decode`).
Shrestha et al. 2025, "Polar Sparsity: High Throughput Batched LLM Inferencing with Scalable
Contextual Sparsity".
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.models.layers import (
    apply_rope, check_attention_fields, logical_param, project_out, project_qkv)
from sparsejax.registry import ATTENTIONS
from sparsejax.sites import Site


def select_heads(scores_BTH: jax.Array, k: int) -> jax.Array:
  """idx_TK: at each position the k heads of largest batch-mean router score (descending).

  idx[t] = top-k_h mean_b scores[b, t, h]; ties go to the lower head index.
  """
  if scores_BTH.ndim != 3:
    raise ValueError(f"scores_BTH must be [B, T, H]; got shape {scores_BTH.shape}")
  _check_k(k, scores_BTH.shape[-1])
  return jax.lax.top_k(jnp.mean(scores_BTH.astype(jnp.float32), axis=0), k)[1]


def head_mask(idx_TK: jax.Array, num_heads: int) -> jax.Array:
  """mask_TH[t, h] = h is in idx[t] (bool)."""
  return jnp.any(idx_TK[..., None] == jnp.arange(num_heads), axis=-2)


def router_loss(scores_BTH: jax.Array, importance_BTH: jax.Array, k: int) -> jax.Array:
  """Mean binary cross-entropy of the router logits against each token's k most important heads.

  label_bth = 1 if h is among the k largest importance_bt (e.g. head output norms, the oracle
  head importance), else 0; loss = mean_bth softplus(s) - label s. No gradient reaches
  `importance`. Shrestha et al. 2025, "Polar Sparsity" (router trained as a top-k classifier).
  """
  _check_k(k, scores_BTH.shape[-1])
  _, oracle_BTK = jax.lax.top_k(jax.lax.stop_gradient(importance_BTH), k)
  labels_BTH = head_mask(oracle_BTK, scores_BTH.shape[-1]).astype(jnp.float32)
  scores_BTH = scores_BTH.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(scores_BTH) - labels_BTH * scores_BTH)


def router_recall(idx_TK: jax.Array, importance_BTH: jax.Array) -> jax.Array:
  """Mean over tokens of the fraction of the token's k most important heads that run (in idx)."""
  k = idx_TK.shape[-1]
  _, oracle_BTK = jax.lax.top_k(importance_BTH, k)
  hit_BTK = jnp.any(oracle_BTK[..., None] == idx_TK[None, :, None, :], axis=-1)
  return jnp.mean(hit_BTK.astype(jnp.float32))


@ATTENTIONS.register("head_routed")
class HeadRoutedAttention(nn.Module):
  """Causal self-attention that runs only the k heads a router picks per position for the batch.

  As CausalSelfAttention (params wq, wk, wv, wo via project_qkv / project_out), plus the router
  W_r: D x H (param "router"). o_bth = attention head h at position t; the output is
  y_bt = sum_{h in idx_t} o_bth W_o[h] with idx_t = select_heads(x W_r, k), k =
  max(1, round(head_fraction H)), the same heads for every sequence of the batch at position t.
  Training computes all heads and zeroes the others (no gradient reaches W_r through y); the
  router learns from the aux loss router_loss_coef * router_loss(x W_r, ||o_bth||, k) against
  the heads' output norms. With k = H the layer equals CausalSelfAttention. Site "heads": the
  masked o_BTHK. `head_routed_decode` is the gathered path of one decode step.
  Losses: "router". Metrics: "active_fraction" (k / H), "router_recall" (fraction of each
  token's k largest-norm heads that run).
  Shrestha et al. 2025, "Polar Sparsity: High Throughput Batched LLM Inferencing with Scalable
  Contextual Sparsity".
  """

  d_model: int
  num_heads: int
  positions: str = "rope"
  dtype: Any = jnp.float32
  rope_max_wavelength: float = 10_000.0
  head_fraction: float = 0.5
  router_loss_coef: float = 0.01

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    check_attention_fields(self.d_model, self.num_heads, self.positions)
    k = active_heads(self.head_fraction, self.num_heads)
    q_BTHK, k_BTHK, v_BTHK = project_qkv(self, x_BTD)
    o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
    router_DH = logical_param(self, "router", nn.initializers.lecun_normal(),
                              (self.d_model, self.num_heads), ("embed", "heads"), self.dtype)
    scores_BTH = x_BTD.astype(self.dtype) @ router_DH
    idx_TK = select_heads(scores_BTH, k)
    mask_1TH1 = head_mask(idx_TK, self.num_heads)[None, :, :, None]
    y_BTD = project_out(self, Site(name="heads")(jnp.where(mask_1TH1, o_BTHK, 0)))
    norms_BTH = jnp.linalg.norm(jax.lax.stop_gradient(o_BTHK).astype(jnp.float32), axis=-1)
    aux = {
        "losses": {"router": self.router_loss_coef * router_loss(scores_BTH, norms_BTH, k)},
        "metrics": {"active_fraction": jnp.asarray(k / self.num_heads),
                    "router_recall": router_recall(idx_TK, norms_BTH)},
    }
    return y_BTD, aux


def head_routed_decode(params: Mapping[str, jax.Array], x_BSD: jax.Array, k: int, *,
                       positions: str = "rope",
                       rope_max_wavelength: float = 10_000.0) -> tuple[jax.Array, jax.Array]:
  """(y_BD, idx_K): HeadRoutedAttention's output at the last position, reading k heads only.

  idx = select_heads(x_{:,S-1} W_r, k) (one choice for the batch); W_q, W_k, W_v [:, idx] and
  W_o[idx] are gathered, q from the last token and k, v from the S context tokens for those
  heads only (what a KV cache of the k heads would hold), and y = sum_{h in idx} o_h W_o[h].
  Equals the layer's y[:, S-1] at O(B S D k K) instead of O(B S D H K) work. `params` is the
  layer's params dict (wq, wk, wv: D x H x K; wo: H x K x D; router: D x H), boxed or not.
  Shrestha et al. 2025, "Polar Sparsity" (selective head attention for batched decode).
  """
  params = nn.meta.unbox(params)
  wq_DHK, wk_DHK, wv_DHK, wo_HKD = (params[name] for name in ("wq", "wk", "wv", "wo"))
  num_heads = wq_DHK.shape[1]
  check_attention_fields(x_BSD.shape[-1], num_heads, positions)
  dtype = wq_DHK.dtype
  x_BSD = x_BSD.astype(dtype)
  last_B1D = x_BSD[:, -1:]
  idx_K = select_heads(last_B1D @ params["router"].astype(dtype), k)[0]
  q_B1KK, k_BSKK, v_BSKK = (
      jnp.einsum("btd,dhk->bthk", x, jnp.take(w_DHK, idx_K, axis=1))
      for x, w_DHK in ((last_B1D, wq_DHK), (x_BSD, wk_DHK), (x_BSD, wv_DHK)))
  if positions == "rope":
    length = x_BSD.shape[1]
    q_B1KK = apply_rope(q_B1KK, jnp.array([[length - 1]]), rope_max_wavelength)
    k_BSKK = apply_rope(k_BSKK, jnp.arange(length)[None, :], rope_max_wavelength)
  o_B1KK = jax.nn.dot_product_attention(q_B1KK, k_BSKK, v_BSKK)
  y_BD = jnp.einsum("bhk,hkd->bd", o_B1KK[:, 0], jnp.take(wo_HKD, idx_K, axis=0))
  return y_BD, idx_K


def active_heads(head_fraction: float, num_heads: int) -> int:
  """k = max(1, round(head_fraction H)) for a fraction in (0, 1]."""
  if isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float)) or not (
      0 < head_fraction <= 1):
    raise ValueError(f"head_fraction={head_fraction!r}; allowed: a fraction in (0, 1]")
  return max(1, round(head_fraction * num_heads))


def _check_k(k: int, num_heads: int) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_heads:
    raise ValueError(f"k={k!r}; allowed: an int in [1, {num_heads}] (the number of heads)")
