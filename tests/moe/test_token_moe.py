"""Tests for the token-mixing MLP and sMLP's token-dimension MoE against naive NumPy loops."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sparsejax.models import build_lm
from sparsejax.moe.token_moe import (TokenMLP, TokenMoE, causal_token_mix, prefix_length,
                                     route_prefix, token_moe_mix)

D, H, L = 8, 4, 7  # d_model, chunks (num_heads), max_len


def _naive_mix(v, w, b):
  """y[t, c] = sum_{s <= t} w[t, s] v[s, c] + b[t] for one (sequence, chunk), by loops."""
  y = np.zeros_like(v)
  for t in range(v.shape[0]):
    for s in range(t + 1):
      y[t] += w[t, s] * v[s]
    y[t] += b[t]
  return y


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))


def _naive_gated_unit(p, x, expert, gate):
  """(u * mix(RMSNorm(v))) W_out with chunk h of sequence b mixed by expert[b, h] * gate[b, h]."""
  p = jax.tree.map(np.asarray, p)
  u, v = np.split(_gelu(x @ p["w_in"]), 2, axis=-1)
  v = v / np.sqrt(np.mean(v**2, -1, keepdims=True) + 1e-6) * p["v_norm"]["scale"]
  batch, length, _ = x.shape
  chunk = D // H
  mixed = np.zeros_like(v)
  for b in range(batch):
    for h in range(H):
      cols = slice(h * chunk, (h + 1) * chunk)
      e = expert[b][h]
      mixed[b, :, cols] = gate[b][h] * _naive_mix(v[b, :, cols], p["spatial_ELL"][e],
                                                  p["spatial_bias_EL"][e])
  return (u * mixed) @ p["w_out"]


def _params(module, x):
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), x))["params"]
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(1)  # spatial weights away from their near-zero init
  params["spatial_ELL"] = rng.normal(size=params["spatial_ELL"].shape).astype(np.float32)
  params["spatial_bias_EL"] = rng.normal(size=params["spatial_bias_EL"].shape).astype(np.float32)
  return jax.tree.map(jnp.asarray, params)


def test_causal_token_mix_and_token_moe_mix_match_naive_loops():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(2, 5, 3, 2)).astype(np.float32)  # B, T < L, chunks, C
  w = rng.normal(size=(4, L, L)).astype(np.float32)  # 4 experts
  bias = rng.normal(size=(4, L)).astype(np.float32)
  expert = np.array([[3, 0, 3], [1, 2, 0]])
  gate = rng.uniform(size=(2, 3)).astype(np.float32)
  got = token_moe_mix(jnp.asarray(v), jnp.asarray(w), jnp.asarray(bias), jnp.asarray(expert),
                      jnp.asarray(gate))
  for b in range(2):
    for h in range(3):
      want = gate[b, h] * _naive_mix(v[b, :, h], w[expert[b, h]], bias[expert[b, h]])
      np.testing.assert_allclose(got[b, :, h], want, rtol=1e-5, atol=1e-5)
  shared = causal_token_mix(jnp.asarray(v), jnp.asarray(w[:1, None]), jnp.asarray(bias[:1, None]))
  np.testing.assert_allclose(shared[1, :, 2], _naive_mix(v[1, :, 2], w[0], bias[0]), atol=1e-5)
  with pytest.raises(ValueError, match="exceeds the spatial weights' max_len"):
    causal_token_mix(jnp.zeros((1, 9, 1, 1)), jnp.zeros((1, 1, L, L)), jnp.zeros((1, 1, L)))


def test_route_prefix_uses_the_first_tokens_mean():
  # P = ceil(0.4 * 5) = 2: logits = mean(v[:2]) W_r; hand-worked for one chunk of width 2.
  v = np.zeros((1, 5, 1, 2), np.float32)
  v[0, 0, 0], v[0, 1, 0], v[0, 4, 0] = [2.0, 0.0], [0.0, 2.0], [-50.0, 50.0]
  router = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], np.float32)  # C x E
  assert prefix_length(5, 0.4) == 2
  expert, gate, probs = route_prefix(jnp.asarray(v), jnp.asarray(router), 2)
  logits = np.array([1.0, 0.0, -1.0])  # mean = [1, 1] -> [1, 0, -1]
  want = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(probs[0, 0], want, rtol=1e-6)
  assert int(expert[0, 0]) == 0 and float(gate[0, 0]) == pytest.approx(want[0])


@pytest.mark.parametrize("layer,first_causal", [
    (TokenMLP(d_model=D, num_heads=H, max_len=L), 0),
    (TokenMoE(d_model=D, num_heads=H, max_len=L, num_experts=2), 0),
    (TokenMoE(d_model=D, num_heads=H, max_len=L, num_experts=2, router="prefix",
              prefix_fraction=0.4), 2),
], ids=["token_mlp", "deterministic", "prefix"])
def test_layer_matches_a_naive_loop_and_is_causal(layer, first_causal):
  """The gated unit with each chunk's expert (token_mlp: the one spatial weight for every
  chunk; deterministic: h mod E; prefix: top-1 of softmax(mean of the first P = 3 tokens'
  chunk W_r)); output at t independent of inputs after t, from t = P - 1 on for "prefix"."""
  x = np.random.default_rng(2).normal(size=(2, L, D)).astype(np.float32)
  p = _params(layer, jnp.asarray(x))
  apply = jax.jit(lambda x: layer.apply({"params": p}, x))
  y, aux = apply(jnp.asarray(x))
  if isinstance(layer, TokenMLP):
    expert, gate = np.zeros((2, H), int), np.ones((2, H))
  elif layer.router == "deterministic":
    expert, gate = np.array([[h % 2 for h in range(H)]] * 2), np.ones((2, H))
  else:
    _, v = np.split(_gelu(x @ np.asarray(p["w_in"])), 2, axis=-1)
    v = v / np.sqrt(np.mean(v**2, -1, keepdims=True) + 1e-6) * np.asarray(p["v_norm"]["scale"])
    expert, gate = np.zeros((2, H), int), np.zeros((2, H))
    for b in range(2):
      for h in range(H):
        logits = v[b, :3, 2 * h:2 * h + 2].mean(0) @ np.asarray(p["router_CE"])
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        expert[b, h], gate[b, h] = probs.argmax(), probs.max()
    assert float(aux["losses"]["load_balance"]) > 0
  np.testing.assert_allclose(y, _naive_gated_unit(p, x, expert, gate), rtol=1e-4, atol=1e-4)
  if isinstance(layer, TokenMoE):
    load = np.bincount(expert.ravel(), minlength=2) / (2 * H)
    np.testing.assert_allclose(aux["metrics"]["expert_load"], load)
  for t in range(first_causal, L - 1):
    changed = x.copy()
    changed[:, t + 1:] += 10.0
    np.testing.assert_allclose(np.asarray(apply(jnp.asarray(changed))[0])[:, :t + 1],
                               np.asarray(y)[:, :t + 1], atol=1e-4,
                               err_msg=f"position {t} read a later input")


def test_all_mlp_lm_has_no_attention_and_is_causal():
  config = ml_collections.ConfigDict({
      "d_model": D, "num_layers": 1, "num_heads": H, "d_ff": 16, "max_len": L,
      "attention": {"name": "token_moe", "num_experts": 2}})
  model = build_lm(config, vocab_size=13)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7]])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  apply = jax.jit(lambda t: model.apply(params, t)[0])
  flat = {"/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}
  assert not any(name.endswith(("wq", "wk", "wv")) for name in flat)
  later = tokens.at[:, 4:].set(0)
  np.testing.assert_allclose(apply(later)[:, :4], apply(tokens)[:, :4], atol=1e-5)


def test_token_moe_rejects_bad_settings():
  with pytest.raises(ValueError, match="router='sinkhorn'; allowed: deterministic, prefix"):
    TokenMoE(d_model=D, num_heads=H, max_len=L, router="sinkhorn")
  with pytest.raises(ValueError, match="num_experts dividing num_heads=4"):
    TokenMoE(d_model=D, num_heads=H, max_len=L, num_experts=3)
