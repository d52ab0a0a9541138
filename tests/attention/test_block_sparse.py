"""The block-sparse attention layer against dense attention with the same params and mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sparsejax.attention.block_sparse import BlockSparseAttention
from sparsejax.models import CausalSelfAttention, apply_rope, build_lm


def init(layer, x_BTD):
  return nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x_BTD)["params"])


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_full_causal_pattern_equals_causal_self_attention(positions):
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 16))
  layer = BlockSparseAttention(d_model=16, num_heads=2, positions=positions, pattern="causal",
                               block=4)
  params = init(layer, x_BTD)
  dense = CausalSelfAttention(d_model=16, num_heads=2, positions=positions)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, nn.meta.unbox(jax.eval_shape(dense.init, jax.random.PRNGKey(1), x_BTD))["params"])
  y_BTD, aux = jax.jit(layer.apply)({"params": params}, x_BTD)
  expected_BTD, _ = jax.jit(dense.apply)({"params": params}, x_BTD)
  np.testing.assert_allclose(y_BTD, expected_BTD, atol=1e-5, rtol=1e-5)
  assert float(aux["metrics"]["attended_fraction"]) == pytest.approx(1.0)


def manual_attention(params, x_BTD, mask_HTT):
  """RoPE attention with an explicit [H, T, T] mask, from the params, in plain jnp."""
  q, k, v = (jnp.einsum("btd,dhk->bthk", x_BTD, params[n]) for n in ("wq", "wk", "wv"))
  positions = jnp.arange(x_BTD.shape[1])[None]
  q, k = apply_rope(q, positions), apply_rope(k, positions)
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask_HTT, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshk,hkd->btd", probs, v, params["wo"])


def test_window_global_and_spans_patterns_equal_masked_dense_attention():
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (1, 19, 16))
  window_global = BlockSparseAttention(d_model=16, num_heads=2, pattern="window_global",
                                       window=3, num_global=2, block=4)
  params = init(window_global, x_BTD)
  loops = np.array([[j <= i and (i - j < 3 or j < 2) for j in range(19)] for i in range(19)])
  y_BTD, aux = jax.jit(window_global.apply)({"params": params}, x_BTD)
  np.testing.assert_allclose(y_BTD, manual_attention(params, x_BTD, loops), atol=1e-5)
  expected_fraction = np.mean(loops.sum(1) / np.arange(1, 20))
  assert float(aux["metrics"]["attended_fraction"]) == pytest.approx(expected_fraction)

  spans = BlockSparseAttention(d_model=16, num_heads=2, pattern="spans", spans=(1, 5), block=4)
  per_head = np.stack([[[0 <= i - j < s for j in range(19)] for i in range(19)] for s in (1, 5)])
  y_BTD, _ = jax.jit(spans.apply)({"params": params}, x_BTD)
  np.testing.assert_allclose(y_BTD, manual_attention(params, x_BTD, per_head), atol=1e-5)


def test_lm_builds_with_block_sparse_attention():
  config = ml_collections.ConfigDict({
      "d_model": 16, "num_layers": 2, "num_heads": 2, "d_ff": 32, "max_len": 24,
      "attention": {"name": "block_sparse", "pattern": "bigbird", "window": 3,
                    "num_global": 1, "num_random": 1, "block": 8},
  })
  model = build_lm(config, vocab_size=11)
  tokens_BT = jnp.arange(40).reshape(2, 20) % 11
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens_BT)
  logits_BTV, aux = jax.jit(model.apply)(variables, tokens_BT)
  assert logits_BTV.shape == (2, 20, 11) and bool(jnp.isfinite(logits_BTV).all())
  fraction = aux["metrics"]["layer_1/attention/attended_fraction"]
  assert 0 < float(fraction) < 1


@pytest.mark.parametrize("fields,message", [
    ({"pattern": "dilated"}, r"pattern='dilated'; allowed: causal, window, window_global"),
    ({"pattern": "spans", "spans": (3,)}, r"spans=\(3,\) must hold one span per head"),
    ({"pattern": "window", "window": 0}, r"window=0 must be a positive int"),
])
def test_bad_fields_are_one_line_errors(fields, message):
  layer = BlockSparseAttention(d_model=16, num_heads=2, **fields)
  with pytest.raises(ValueError, match=message):
    layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 16)))
