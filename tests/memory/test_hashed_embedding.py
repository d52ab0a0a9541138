"""Hashed multi-hot n-gram embeddings: against a pure-Python reference, causal, in the LM."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sparsejax.memory import HashedEmbedding, hashed_embed, ngram_rows
from sparsejax.models import build_lm
from sparsejax.registry import EMBEDDINGS

M32 = 0xFFFFFFFF


def py_fmix32(h):
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def py_row(gram, j, num_rows):
  """The documented hash with Python ints: FNV-1a over (n, g + 1...), seeded murmur finaliser."""
  key = 0x811C9DC5
  for c in (len(gram), *(g + 1 for g in gram)):
    key = ((key ^ c) * 0x01000193) & M32
  return py_fmix32(key ^ (((j + 1) * 0x9E3779B9) & M32)) % num_rows


def np_reference(table, tokens, max_n, num_hashes):
  """Loop over positions and the n-grams ending there; sum their hashed rows."""
  table = np.asarray(table, np.float64)
  out = np.zeros(tokens.shape + (table.shape[1],))
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      for n in range(1, max_n + 1):
        if t - n + 1 < 0:
          continue
        gram = [int(x) for x in tokens[b, t - n + 1 : t + 1]]
        for j in range(num_hashes):
          out[b, t] += table[py_row(gram, j, table.shape[0])]
  return out


@pytest.mark.parametrize("max_n, num_hashes, num_rows", [(3, 2, 97), (1, 1, 300), (4, 3, 64)])
def test_matches_python_reference(max_n, num_hashes, num_rows):
  rng = np.random.default_rng(max_n)
  tokens = rng.integers(0, 258, (2, 7))
  table = rng.normal(size=(num_rows, 5)).astype(np.float32)
  got = jax.jit(lambda tb, tk: hashed_embed(tb, tk, max_n=max_n, num_hashes=num_hashes))(
      table, tokens)
  np.testing.assert_allclose(got, np_reference(table, tokens, max_n, num_hashes),
                             rtol=1e-5, atol=1e-5)
  rows, valid = ngram_rows(tokens, max_n=max_n, num_hashes=num_hashes, num_rows=num_rows)
  assert rows.shape == valid.shape == (2, 7, max_n * num_hashes)
  np.testing.assert_array_equal(valid.sum(-1)[0], num_hashes * np.minimum(np.arange(7) + 1, max_n))
  assert rows[0, 3, 0] == py_row([int(tokens[0, 3])], 0, num_rows)  # unigram, first hash


def test_causal_and_distinguishes_contexts():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(512, 8)), jnp.float32)
  tokens = rng.integers(0, 256, (1, 10))
  changed = tokens.copy()
  changed[0, 6:] = (changed[0, 6:] + 1) % 256
  a = np.asarray(hashed_embed(table, tokens, max_n=3, num_hashes=2))
  b = np.asarray(hashed_embed(table, changed, max_n=3, num_hashes=2))
  np.testing.assert_array_equal(a[0, :6], b[0, :6])  # the past never sees the future
  assert np.all(np.abs(a[0, 6:] - b[0, 6:]).max(-1) > 0)
  # The same byte after different bytes gets a different embedding (its bigram and trigram).
  same_last = np.array([[5, 9, 7], [6, 8, 7]])
  e = np.asarray(hashed_embed(table, same_last, max_n=3, num_hashes=2))
  assert np.abs(e[0, 2] - e[1, 2]).max() > 0


def test_bad_fields_are_clear_errors():
  with pytest.raises(ValueError, match="num_hashes must be a positive int, got 0"):
    HashedEmbedding(d_model=8, num_hashes=0)
  with pytest.raises(ValueError, match="tokens must be integer ids"):
    hashed_embed(jnp.zeros((4, 2)), jnp.zeros((1, 3)), max_n=2, num_hashes=1)
  config = lm_config()
  config.tie_embeddings = True
  with pytest.raises(ValueError, match="embedding 'hashed' has no vocab table to tie"):
    build_lm(config, vocab_size=258)
  config = lm_config()
  config.embedding.num_buckets = 3
  with pytest.raises(ValueError, match="unknown embedding kwarg 'num_buckets'"):
    build_lm(config, vocab_size=258)


def lm_config():
  return ml_collections.ConfigDict(dict(
      d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16, tie_embeddings=False,
      embedding={"name": "hashed", "num_rows": 1024, "max_n": 3, "num_hashes": 2},
  ))


def test_lm_with_hashed_embedding_trains():
  assert EMBEDDINGS.get("hashed") is HashedEmbedding
  model = build_lm(lm_config(), vocab_size=258)
  text = np.frombuffer(b"def f(x):\n    return x + 1\n" * 4, np.uint8).astype(np.int32)
  batch = np.stack([text[i : i + 17] for i in range(0, 64, 8)])
  inputs, targets = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), inputs))["params"]
  assert params["embed"]["table"].shape == (1024, 32) and "lm_head" in params
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 2.0
