"""T-FREE's output side: a multi-hot head over hashed word-trigram buckets, its loss and decoding.

A word w is written with a space on each side and split into its distinct byte trigrams
tri(w) (" hi " -> {" hi", "hi "}); trigram t = (c_0, c_1, c_2) has the key
k(t) = c_0 + 256 c_1 + 65536 c_2 and m buckets

    h_j(t) = fmix32(k(t) ^ (j + 1) * 0x9E3779B9) mod V,   j < m,

with fmix32 murmur3's 32-bit finaliser. The word's activation pattern is the set
B(w) = {h_j(t) : t in tri(w), j < m} (duplicates merged), padded per vocabulary to
K = max_w |B(w)| slots (`vocab_buckets`: idx_WK, valid_WK).

The head maps a hidden state to V bucket logits, o_BV = x_BD W_DV + b_V, and is trained as V
independent binary problems against the multi-hot target y_v = [v in B(w_next)]:

    loss = (1/V) sum_v [softplus(o_v) - y_v o_v]  (binary cross-entropy with logits),

computed from the K target indices without building y (`tfree_loss`). Decoding scores each
word of a dictionary by the mean sigmoid activation of its pattern,

    s_w = (1/|B(w)|) sum_{v in B(w)} sigmoid(o_v),

picks argmax_w s_w, and softmax_w(s) is the word distribution (`word_scores`, `decode_words`).
The same patterns give the input side as an embedding bag, e_w = sum_{v in B(w)} E[v]
(`pkm.embedding_bag(E, idx_WK[w], valid_WK[w])`); `HashedEmbedding` is the byte-n-gram variant
that our byte-level LM uses.

Use (a word-level model; our "lm" task is byte-level with a softmax head, so no trainer config
uses this head yet):

  idx_WK, valid_WK = vocab_buckets(words, num_buckets=V, num_hashes=m)   # host, once
  logits_BTV, aux = TFreeHead(num_buckets=V).apply(variables, h_BTD)
  loss_BT = tfree_loss(logits_BTV, idx_WK[next_word_BT], valid_WK[next_word_BT])
  best_BT, log_probs_BTW = decode_words(logits_BTV, idx_WK, valid_WK)

Shape letters beyond the DESIGN legend: V buckets, W dictionary words, K pattern slots per word.

Deiseroth et al. 2024, "T-FREE: Subword Tokenizer-Free Generative LLMs via Sparse
Representations for Memory-Efficient Embeddings" (sections 3.1-3.2: trigram hashing, multi-label
BCE head, dictionary decoding by normalised pattern activation).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux, empty_aux
from sparsejax.memory.hashed_embedding import GOLDEN, fmix32


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def word_trigrams(word: str) -> list[bytes]:
  """The distinct byte trigrams of " word " (UTF-8), in order of first appearance."""
  if not isinstance(word, str) or not word:
    raise ValueError(f"word must be a non-empty str, got {word!r}")
  padded = f" {word} ".encode("utf-8")
  return list(dict.fromkeys(padded[i : i + 3] for i in range(len(padded) - 2)))


def word_buckets(word: str, *, num_buckets: int, num_hashes: int) -> np.ndarray:
  """B(w): the sorted distinct buckets h_j(t) of the word's trigrams, int32 in [0, V)."""
  _check_positive(num_buckets=num_buckets, num_hashes=num_hashes)
  if num_buckets > 2**31 - 1:
    raise ValueError(f"num_buckets={num_buckets} must fit in int32")
  keys = np.array([t[0] + 256 * t[1] + 65536 * t[2] for t in word_trigrams(word)], np.uint32)
  seeds = np.array([((j + 1) * int(GOLDEN)) & 0xFFFFFFFF for j in range(num_hashes)], np.uint32)
  buckets = fmix32(keys[:, None] ^ seeds[None, :]) % np.uint32(num_buckets)
  return np.unique(buckets).astype(np.int32)


def vocab_buckets(words: Sequence[str], *, num_buckets: int, num_hashes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Every word's pattern padded to K = max |B(w)| slots: (idx_WK int32, valid_WK bool)."""
  if len(words) == 0:
    raise ValueError("words must name at least one word, got an empty sequence")
  patterns = [word_buckets(w, num_buckets=num_buckets, num_hashes=num_hashes) for w in words]
  width = max(len(p) for p in patterns)
  idx_WK = np.zeros((len(words), width), np.int32)
  valid_WK = np.zeros((len(words), width), bool)
  for i, p in enumerate(patterns):
    idx_WK[i, : len(p)] = p
    valid_WK[i, : len(p)] = True
  return idx_WK, valid_WK


def multi_hot(idx_BK: jax.Array, valid_BK: jax.Array, num_buckets: int) -> jax.Array:
  """y_BV = 1 at the valid indices of each row, 0 elsewhere (float32; leading dims arbitrary)."""
  lead = idx_BK.shape[:-1]
  idx_NK = jnp.reshape(idx_BK, (-1, idx_BK.shape[-1]))
  rows_N1 = jnp.arange(idx_NK.shape[0])[:, None]
  y_NV = jnp.zeros((idx_NK.shape[0], num_buckets), jnp.float32).at[rows_N1, idx_NK].max(
      jnp.reshape(valid_BK, idx_NK.shape).astype(jnp.float32))
  return jnp.reshape(y_NV, (*lead, num_buckets))


def tfree_loss(logits_BV: jax.Array, idx_BK: jax.Array, valid_BK: jax.Array) -> jax.Array:
  """Per-position multi-label BCE (1/V) sum_v [softplus(o_v) - y_v o_v], y = pattern (idx, valid).

  The pattern's indices must be distinct (as `vocab_buckets` gives them); float32, shape (...).
  """
  if idx_BK.shape != valid_BK.shape or idx_BK.shape[:-1] != logits_BV.shape[:-1]:
    raise ValueError(f"idx {idx_BK.shape} and valid {valid_BK.shape} must match logits "
                     f"{logits_BV.shape} in their leading dims")
  logits_BV = logits_BV.astype(jnp.float32)
  hit_BK = jnp.take_along_axis(logits_BV, idx_BK, axis=-1)
  hit = jnp.sum(jnp.where(valid_BK, hit_BK, 0.0), axis=-1)
  return (jnp.sum(jax.nn.softplus(logits_BV), axis=-1) - hit) / logits_BV.shape[-1]


def word_scores(logits_BV: jax.Array, idx_WK: jax.Array, valid_WK: jax.Array) -> jax.Array:
  """s_BW = mean of sigmoid(o) over each dictionary word's pattern (float32)."""
  if idx_WK.shape != valid_WK.shape or idx_WK.ndim != 2:
    raise ValueError(f"idx and valid must both be (W, K), got {idx_WK.shape} and "
                     f"{valid_WK.shape}")
  probs_BV = jax.nn.sigmoid(logits_BV.astype(jnp.float32))
  gathered_BWK = jnp.take(probs_BV, idx_WK, axis=-1)
  valid_WK = valid_WK.astype(jnp.float32)
  return jnp.sum(gathered_BWK * valid_WK, axis=-1) / jnp.maximum(jnp.sum(valid_WK, -1), 1.0)


def decode_words(logits_BV: jax.Array, idx_WK: jax.Array, valid_WK: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """(argmax_w s_w int32, log softmax_w(s) float32): the best dictionary word and the paper's
  word distribution, from the bucket logits."""
  scores_BW = word_scores(logits_BV, idx_WK, valid_WK)
  return jnp.argmax(scores_BW, axis=-1).astype(jnp.int32), jax.nn.log_softmax(scores_BW, -1)


class TFreeHead(nn.Module):
  """Bucket logits o_BV = x_BD W_DV + b_V for the multi-hot trigram target (T-FREE's LM head).

  W (d, V; logical axes ("embed", "vocab")) is LeCun-normal, b zero; V does not grow with the
  dictionary. Train with `tfree_loss`, decode with `decode_words`.
  Deiseroth et al. 2024, "T-FREE".

  Attributes:
    num_buckets: V, the hashed bucket count (the paper's vocabulary size v).
    dtype: compute dtype of the logits (params stay float32).
  """

  num_buckets: int
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_positive(num_buckets=self.num_buckets)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BD: jax.Array) -> tuple[jax.Array, Aux]:
    w_DV = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ("embed", "vocab")),
                      (x_BD.shape[-1], self.num_buckets), jnp.float32)
    b_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                     (self.num_buckets,), jnp.float32)
    logits_BV = x_BD.astype(self.dtype) @ w_DV.astype(self.dtype) + b_V.astype(self.dtype)
    return logits_BV, empty_aux()
