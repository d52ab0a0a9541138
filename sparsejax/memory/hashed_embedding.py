"""Hashed multi-hot embeddings: a token's embedding is the sum of hashed rows of its n-grams.

Position t of a token sequence x has the n-grams g_{t,n} = (x_{t-n+1}, ..., x_t) for
n = 1..max_n (only those that start at or after position 0). Each n-gram is hashed by m fixed,
seeded hash functions into rows of a table E of R rows (R far smaller than the number of
distinct n-grams), and the embedding is the multi-hot sum

    e_t = sum_{n <= min(max_n, t + 1)} sum_{j < m} E[h_j(g_{t,n}) mod R],

an embedding bag (`pkm.embedding_bag`) of at most M = max_n * m rows. It uses only the current
and past tokens, so a causal LM stays causal; R and m trade collisions against table size the
way a Bloom filter does, and the n-gram rows give the model sub-word context before any layer.
The hash is a fixed integer function (FNV-1a over the n-gram, then m seeded murmur3 finalisers),
identical on every backend.

Shape letters beyond the DESIGN legend: R rows of the table, M = max_n * m rows per position.

Deiseroth et al. 2024, "T-FREE: Subword Tokenizer-Free Generative LLMs via Sparse
Representations for Memory-Efficient Embeddings" (hashed trigram multi-hot embeddings); Bloom
1970 (multiple hash functions per item).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.memory.pkm import embedding_bag
from sparsejax.registry import EMBEDDINGS

FNV_OFFSET = np.uint32(0x811C9DC5)
FNV_PRIME = np.uint32(0x01000193)
GOLDEN = np.uint32(0x9E3779B9)
MIX1 = np.uint32(0x85EBCA6B)
MIX2 = np.uint32(0xC2B2AE35)


def fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser (uint32 -> uint32, a bijection that mixes every bit)."""
  h = h ^ (h >> 16)
  h = h * MIX1
  h = h ^ (h >> 13)
  h = h * MIX2
  return h ^ (h >> 16)


def _check(max_n: int, num_hashes: int, num_rows: int) -> None:
  for name, value in (("max_n", max_n), ("num_hashes", num_hashes), ("num_rows", num_rows)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if num_rows > 2**31 - 1:
    raise ValueError(f"num_rows={num_rows} must fit in int32")


def ngram_rows(
    tokens_BT: jax.Array, *, max_n: int, num_hashes: int, num_rows: int
) -> tuple[jax.Array, jax.Array]:
  """Table rows of every hashed n-gram ending at each position, and which of them exist.

  For n = 1..max_n and j < num_hashes, slot (n - 1) * num_hashes + j of position t holds
  row_{t,n,j} = fmix32(key(g_{t,n}) ^ (j + 1) * 0x9E3779B9) mod R, where
  key(g) = FNV-1a over (n, g_1 + 1, ..., g_n + 1) in uint32 (each step k = (k ^ c) * 0x01000193,
  starting from 0x811C9DC5). valid_{t,n,j} = (t >= n - 1): n-grams reaching before the start of
  the sequence do not exist. Tokens must be non-negative ints below 2^32 - 1; leading dims are
  arbitrary, the last one is time.

  Returns:
    (rows_BTM int32 in [0, R), valid_BTM bool), M = max_n * num_hashes.
  """
  _check(max_n, num_hashes, num_rows)
  tokens_BT = jnp.asarray(tokens_BT)
  if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer ids, got dtype {tokens_BT.dtype}")
  length = tokens_BT.shape[-1]
  pad = [(0, 0)] * (tokens_BT.ndim - 1) + [(max_n - 1, 0)]
  padded = jnp.pad(tokens_BT.astype(jnp.uint32) + np.uint32(1), pad)
  # back[s][..., t] = token at t - s (plus one), 0 before the start.
  back = [padded[..., max_n - 1 - s : max_n - 1 - s + length] for s in range(max_n)]
  time_T = jnp.arange(length)
  seeds = [np.uint32(((j + 1) * int(GOLDEN)) & 0xFFFFFFFF) for j in range(num_hashes)]
  rows, valid = [], []
  for n in range(1, max_n + 1):
    key = np.uint32(((int(FNV_OFFSET) ^ n) * int(FNV_PRIME)) & 0xFFFFFFFF)
    for s in range(n - 1, -1, -1):  # oldest token first
      key = (key ^ back[s]) * FNV_PRIME
    exists = jnp.broadcast_to(time_T >= n - 1, key.shape)
    for seed in seeds:
      rows.append((fmix32(key ^ seed) % np.uint32(num_rows)).astype(jnp.int32))
      valid.append(exists)
  return jnp.stack(rows, axis=-1), jnp.stack(valid, axis=-1)


def hashed_embed(
    table_RD: jax.Array, tokens_BT: jax.Array, *, max_n: int, num_hashes: int
) -> jax.Array:
  """e_t = sum of the table rows of every hashed n-gram ending at t (see `ngram_rows`).

  An embedding bag over at most max_n * num_hashes rows per position, in the table's dtype;
  causal. Deiseroth et al. 2024, "T-FREE".
  """
  if table_RD.ndim != 2:
    raise ValueError(f"table must have shape (R, D), got {table_RD.shape}")
  rows_BTM, valid_BTM = ngram_rows(
      tokens_BT, max_n=max_n, num_hashes=num_hashes, num_rows=table_RD.shape[0]
  )
  return embedding_bag(table_RD, rows_BTM, valid_BTM.astype(table_RD.dtype))


@EMBEDDINGS.register("hashed")
class HashedEmbedding(nn.Module):
  """Input embedding by hashed byte n-grams: x_t = sum_{n, j} E[h_j(x_{t-n+1..t}) mod R].

  The table E (num_rows x d_model, float32, logical axes ("vocab", "embed")) is initialised with
  stddev d_model^-0.5 / sqrt(max_n * num_hashes), so a position's multi-hot sum has about the
  scale of a plain embedding row. The table size does not depend on the vocabulary, so the layer
  declares no `vocab_size` (the model passes none). There is no `attend`: an LM using it needs an
  untied output head.
  Deiseroth et al. 2024, "T-FREE: Subword Tokenizer-Free Generative LLMs via Sparse
  Representations for Memory-Efficient Embeddings".

  Attributes:
    d_model: D, the embedding width.
    num_rows: R, rows of the hashed table.
    max_n: n-grams of 1..max_n tokens ending at each position.
    num_hashes: m, hash functions per n-gram.
    dtype: compute dtype of the output.
  """

  d_model: int
  num_rows: int = 4096
  max_n: int = 3
  num_hashes: int = 2
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check(self.max_n, self.num_hashes, self.num_rows)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    stddev = self.d_model**-0.5 / (self.max_n * self.num_hashes) ** 0.5
    table_RD = self.param(
        "table",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev), ("vocab", "embed")),
        (self.num_rows, self.d_model),
        jnp.float32,
    )
    x_BTD = hashed_embed(table_RD, tokens_BT, max_n=self.max_n, num_hashes=self.num_hashes)
    return x_BTD.astype(self.dtype)
