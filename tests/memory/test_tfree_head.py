"""T-FREE output head: hand-worked word -> buckets -> multi-hot, decoding, BCE vs NumPy."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from sparsejax.memory import tfree_head as tf

M32 = 0xFFFFFFFF


def py_fmix32(h):
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def test_hand_worked_word_to_multi_hot():
  # " hi " -> trigrams " hi" (32, 104, 105) and "hi " (104, 105, 32); key = c0 + 256 c1 + 65536 c2.
  assert tf.word_trigrams("hi") == [b" hi", b"hi "]
  keys = [32 + 256 * 104 + 65536 * 105, 104 + 256 * 105 + 65536 * 32]
  assert keys == [6907936, 2124136]
  seeds = [0x9E3779B9, (2 * 0x9E3779B9) & M32]
  expected = sorted({py_fmix32(k ^ s) % 97 for k in keys for s in seeds})
  got = tf.word_buckets("hi", num_buckets=97, num_hashes=2)
  np.testing.assert_array_equal(got, expected)
  idx, valid = tf.vocab_buckets(["hi", "a"], num_buckets=97, num_hashes=2)
  assert idx.shape == valid.shape == (2, len(expected)) and valid[0].all()
  y = np.asarray(jax.jit(tf.multi_hot, static_argnums=2)(idx, valid, 97))
  hand = np.zeros((2, 97))
  hand[0, expected] = 1.0
  hand[1, sorted({py_fmix32(k ^ s) % 97 for k in (32 + 256 * 97 + 65536 * 32,)
                  for s in seeds})] = 1.0  # " a " is one trigram
  np.testing.assert_array_equal(y, hand)


def test_decode_picks_the_planted_word():
  words = ["cat", "cats", "ca", "at", "dog", "catalog"]
  idx, valid = tf.vocab_buckets(words, num_buckets=256, num_hashes=2)
  logits = np.full((len(words), 256), -4.0, np.float32)
  for i in range(len(words)):
    logits[i, idx[i][valid[i]]] = 4.0
  best, log_probs = jax.jit(tf.decode_words)(logits, idx, valid)
  np.testing.assert_array_equal(best, np.arange(len(words)))
  # Scores against a loop over each word's distinct buckets.
  sig = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  naive = np.array([[np.mean(sig[b, sorted(set(idx[w][valid[w]]))]) for w in range(len(words))]
                    for b in range(len(words))])
  scores = np.log(np.exp(naive) / np.exp(naive).sum(-1, keepdims=True))
  np.testing.assert_allclose(log_probs, scores, rtol=1e-5)


def test_loss_matches_numpy_bce():
  rng = np.random.default_rng(0)
  idx, valid = tf.vocab_buckets(["the", "sparse", "x"], num_buckets=40, num_hashes=3)
  logits = rng.normal(0, 2, (3, 40)).astype(np.float32)
  y = np.zeros((3, 40))
  for i in range(3):
    y[i, idx[i][valid[i]]] = 1.0
  s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  naive = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s), axis=-1)
  got = jax.jit(tf.tfree_loss)(logits, idx, valid)
  np.testing.assert_allclose(got, naive, rtol=1e-5)


def test_head_module_is_affine_and_checks():
  head = tf.TFreeHead(num_buckets=12)
  x = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
  variables = jax.jit(head.init)(jax.random.PRNGKey(0), x)
  logits, aux = jax.jit(head.apply)(variables, x)
  params = nn.meta.unbox(variables["params"])
  w, b = np.asarray(params["kernel"]), np.asarray(params["bias"])
  np.testing.assert_allclose(logits, np.asarray(x) @ w + b, rtol=1e-5, atol=1e-6)
  assert set(aux) == {"losses", "metrics"}
  with pytest.raises(ValueError, match="num_buckets must be a positive int, got 0"):
    tf.TFreeHead(num_buckets=0)
  with pytest.raises(ValueError, match="word must be a non-empty str"):
    tf.word_buckets("", num_buckets=8, num_hashes=1)
  with pytest.raises(ValueError, match="num_hashes must be a positive int"):
    tf.vocab_buckets(["a"], num_buckets=8, num_hashes=0)
