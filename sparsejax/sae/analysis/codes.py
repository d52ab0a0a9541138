"""Sparse embedding codes at several sparsities from one TopK SAE, and their retrieval accuracy."""
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sparsejax.sae.analysis._checks import check_int, check_ndim, check_same
from sparsejax.sae.analysis.geometry import unit_rows


def sparse_codes(acts_TN: Any, ks: Sequence[int]) -> dict[int, jax.Array]:
  """{k: codes [T, N]} keeping each row's k largest latents and zeroing the rest, for each k.

  codes_k[t, n] = a_tn if a_tn is among the k largest of row t (ties to the lower n), else 0.
  One TopK SAE over sentence embeddings thus serves every budget k <= its own K: the embedding's
  cost follows k, not N, in storage and in sparse dot products.
  Wen et al. 2025, "Beyond Matryoshka: Revisiting Sparse Coding for Adaptive Representation"
  (Contrastive Sparse Representation, CSR).
  """
  check_ndim("acts", acts_TN, 2, "(T, N)")
  acts_TN = jnp.asarray(acts_TN)
  num_latents = acts_TN.shape[1]
  if len(ks) == 0:
    raise ValueError(f"ks must name at least one k in [1, {num_latents}], got {ks!r}")
  for k in ks:
    check_int("each k in ks", k, 1, num_latents)
  return {k: _keep_top_k(acts_TN, k) for k in ks}


@functools.partial(jax.jit, static_argnames="k")
def _keep_top_k(acts_TN: jax.Array, k: int) -> jax.Array:
  values_TK, idx_TK = jax.lax.top_k(acts_TN, k)
  rows_T1 = jnp.arange(acts_TN.shape[0])[:, None]
  return jnp.zeros_like(acts_TN).at[rows_T1, idx_TK].set(values_TK)


def retrieval_accuracy(codes_query_QN: Any, codes_corpus_CN: Any, labels_query_Q: Any,
                       labels_corpus_C: Any, *, k: int = 1) -> jax.Array:
  """The fraction of queries with a same-label item among their k cosine-nearest corpus items.

  hit_q = [exists c in top-k_c cos(x_q, y_c) with label_c = label_q] (ties to the lower c; a zero
  code has cosine 0 to everything); accuracy = mean_q hit_q. With k = 1 this is the 1-NN
  classification accuracy CSR reports for image embeddings.
  Wen et al. 2025, "Beyond Matryoshka: Revisiting Sparse Coding for Adaptive Representation".
  """
  check_ndim("codes_query", codes_query_QN, 2, "(Q, N)")
  check_ndim("codes_corpus", codes_corpus_CN, 2, "(C, N)")
  check_same("codes_corpus' N", jnp.shape(codes_corpus_CN)[1], jnp.shape(codes_query_QN)[1],
             "codes_query's N")
  check_same("labels_query's shape", jnp.shape(labels_query_Q), jnp.shape(codes_query_QN)[:1],
             "(Q,) of codes_query")
  check_same("labels_corpus' shape", jnp.shape(labels_corpus_C), jnp.shape(codes_corpus_CN)[:1],
             "(C,) of codes_corpus")
  check_int("k", k, 1, jnp.shape(codes_corpus_CN)[0])
  return _retrieval_accuracy(*(jnp.asarray(x) for x in (codes_query_QN, codes_corpus_CN,
                                                        labels_query_Q, labels_corpus_C)), k)


@functools.partial(jax.jit, static_argnames="k")
def _retrieval_accuracy(codes_query_QN: jax.Array, codes_corpus_CN: jax.Array,
                        labels_query_Q: jax.Array, labels_corpus_C: jax.Array,
                        k: int) -> jax.Array:
  cos_QC = unit_rows(codes_query_QN) @ unit_rows(codes_corpus_CN).T
  _, nearest_QK = jax.lax.top_k(cos_QC, k)
  hits_QK = labels_corpus_C[nearest_QK] == labels_query_Q[:, None]
  return jnp.mean(jnp.any(hits_QK, axis=1).astype(jnp.float32))
