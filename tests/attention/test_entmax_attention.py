"""EntmaxAttention against CausalSelfAttention (softmax), optax's simplex projection (sparsemax)
and a float64 NumPy entmax bisection (entmax at its initial alpha = 1.5); the LM builds with it."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from optax.projections import projection_simplex

from sparsejax.attention import EntmaxAttention, attention_probs, causal_scores
from sparsejax.models import CausalSelfAttention, apply_rope, build_lm
from sparsejax.registry import ATTENTIONS
from tests.ops.test_entmax import np_entmax_rows

D, H, T = 16, 2, 6


def _inputs(scale=1.0):
  return jax.random.normal(jax.random.key(0), (2, T, D)) * scale


def _plain(params):
  return {name: np.asarray(getattr(p, "value", p), np.float64) for name, p in params.items()}


def _reference_attention(params, x_BTD, probs_fn, rope):
  """y = concat_h(probs_fn(q_h k_h^T / sqrt(K) + M) v_h) W_o, M_ts = -inf for s > t."""
  p = _plain(params)
  x = np.asarray(x_BTD, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[name]) for name in ("wq", "wk", "wv"))
  if rope:
    positions_1T = np.arange(T)[None, :]
    q, k = (np.asarray(apply_rope(jnp.asarray(a, jnp.float32), positions_1T), np.float64)
            for a in (q, k))
  scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(D // H)
  probs = probs_fn(np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf))
  y = np.einsum("bthk,hkd->btd", np.einsum("bhts,bshk->bthk", probs, v), p["wo"])
  return y, probs


def _project_rows(scores_BHTS):
  """optax's projection_simplex of each row, the -inf (masked) scores as a large finite negative."""
  finite = np.isfinite(scores_BHTS)
  filled = np.where(finite, scores_BHTS, scores_BHTS[finite].min() - 1e3)
  project = jax.jit(jax.vmap(jax.vmap(jax.vmap(projection_simplex))))
  return np.asarray(project(jnp.asarray(filled, jnp.float32)), np.float64)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_softmax_normalizer_equals_causal_self_attention(positions):
  x = _inputs()
  dense = CausalSelfAttention(d_model=D, num_heads=H, positions=positions)
  params = dense.init(jax.random.key(1), x)["params"]
  layer = EntmaxAttention(d_model=D, num_heads=H, positions=positions, normalizer="softmax")
  own_params = layer.init(jax.random.key(1), x)["params"]
  assert jax.tree.structure(own_params) == jax.tree.structure(params)
  y, aux = layer.apply({"params": params}, x)
  want, _ = dense.apply({"params": params}, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(aux["metrics"]["attended_fraction"]) == 1.0
  np.testing.assert_array_equal(aux["metrics"]["alpha"], np.ones(H))


def test_sparsemax_normalizer_is_the_simplex_projection_of_each_causal_row():
  x = _inputs(scale=4.0)  # large scores: sparse rows
  layer = EntmaxAttention(d_model=D, num_heads=H, normalizer="sparsemax")
  params = layer.init(jax.random.key(1), x)["params"]
  y, aux = layer.apply({"params": params}, x)
  want_y, want_probs = _reference_attention(params, x, _project_rows, rope=True)
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  fraction = np.mean(np.sum(want_probs > 1e-6, axis=-1) / np.arange(1, T + 1))
  assert fraction < 0.9
  np.testing.assert_allclose(aux["metrics"]["attended_fraction"], fraction, atol=1e-6)
  np.testing.assert_array_equal(aux["metrics"]["alpha"], np.full(H, 2.0))


def test_sparsemax_probs_are_sparse_causal_distributions():
  q_BTHK, k_BTHK = 3 * jax.random.normal(jax.random.key(2), (2, 2, T, H, 4))
  probs = np.asarray(attention_probs(causal_scores(q_BTHK, k_BTHK), "sparsemax"))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert np.all(probs >= 0)
  future, causal = np.triu_indices(T, 1), np.tril_indices(T)
  assert np.all(probs[..., future[0], future[1]] == 0)
  assert np.any(probs[..., causal[0], causal[1]] == 0)


def test_entmax_normalizer_at_init_is_one_and_a_half_entmax():
  x = _inputs(scale=3.0)
  layer = EntmaxAttention(d_model=D, num_heads=H, positions="learned")
  params = layer.init(jax.random.key(1), x)["params"]
  assert params["alpha"].value.shape == (H,)
  y, aux = layer.apply({"params": params}, x)
  want_y, _ = _reference_attention(params, x, lambda s: np_entmax_rows(s, 1.5), rope=False)
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(aux["metrics"]["alpha"], np.full(H, 1.5))
  assert 0 < float(aux["metrics"]["attended_fraction"]) < 1


def test_entmax_gradients_are_finite_and_reach_alpha():
  x = _inputs(scale=3.0)
  layer = EntmaxAttention(d_model=D, num_heads=H)
  params = layer.init(jax.random.key(1), x)["params"]
  loss = lambda params: jnp.sum(jnp.sin(layer.apply({"params": params}, x)[0]))
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
  assert np.all(np.abs(grads["alpha"].value) > 0)


@pytest.mark.parametrize("attention", [{"name": "entmax"},
                                       {"name": "entmax", "normalizer": "sparsemax"}])
def test_lm_builds_with_entmax_attention(attention):
  assert "entmax" in ATTENTIONS
  config = ml_collections.ConfigDict(dict(d_model=D, num_layers=2, num_heads=H, d_ff=32,
                                          max_len=T, attention=attention))
  model = build_lm(config, vocab_size=11)
  tokens = jax.random.randint(jax.random.key(3), (2, T), 0, 11)
  variables = model.init(jax.random.key(4), tokens)
  logits, aux = model.apply(variables, tokens)
  assert logits.shape == (2, T, 11) and np.all(np.isfinite(logits))
  assert ("alpha" in variables["params"]["layer_0"]["attention"]) == ("normalizer" not in attention)
  for layer in range(2):
    assert 0 < float(aux["metrics"][f"layer_{layer}/attention/attended_fraction"]) <= 1
    assert aux["metrics"][f"layer_{layer}/attention/alpha"].shape == (H,)


def test_bad_normalizer_raises_a_value_error_naming_it():
  layer = EntmaxAttention(d_model=D, num_heads=H, normalizer="relu")
  with pytest.raises(ValueError, match="normalizer='relu'; allowed: entmax, sparsemax, softmax"):
    layer.init(jax.random.key(0), _inputs())
