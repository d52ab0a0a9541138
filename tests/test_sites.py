"""Tests for sparsejax.sites against a NumPy re-computation of a tiny TransformerLM."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sites
from sparsejax.models import DenseFFN, TransformerLM
from sparsejax.models import layers as model_layers
from sparsejax.models import transformer as model_transformer

VOCAB, D, LAYERS, HEADS, F, T = 13, 8, 2, 2, 12, 5
BLOCK_SITES = ("resid_pre", "attention/heads", "resid_mid", "ffn/in", "ffn/hidden", "ffn/out",
               "resid_post")


@pytest.fixture(scope="module")
def lm():
  model = TransformerLM(vocab_size=VOCAB, d_model=D, num_layers=LAYERS, num_heads=HEADS, d_ff=F,
                        max_len=8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, T)), jnp.int32)
  variables = nn.meta.unbox(model.init(jax.random.key(0), tokens))
  return model, variables, tokens


def np_rms_norm(x, scale):
  return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale


def np_rope(x_BTHK):
  """Rotary embedding, half-split pairs, angle t * 10000^(-2r/K)."""
  t_len, k = x_BTHK.shape[1], x_BTHK.shape[-1]
  angle_TR = np.arange(t_len)[:, None] * 10_000.0 ** (-2.0 * np.arange(k // 2) / k)
  cos, sin = np.cos(angle_TR)[None, :, None], np.sin(angle_TR)[None, :, None]
  a, b = x_BTHK[..., : k // 2], x_BTHK[..., k // 2 :]
  return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def np_causal_attention(q, k, v):
  """o[b,t,h] = sum_{s<=t} softmax_s(q[b,t,h] . k[b,s,h] / sqrt(K)) v[b,s,h], by loops."""
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for t in range(q.shape[1]):
        scores = k[b, : t + 1, h] @ q[b, t, h] / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max())
        out[b, t, h] = (weights / weights.sum()) @ v[b, : t + 1, h]
  return out


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_forward(params, tokens):
  """Every site of the LM and its logits, recomputed in float64 NumPy from the params."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embed"]["embedding"][np.asarray(tokens)]
  values = {}
  for layer in range(LAYERS):
    lp = p[f"layer_{layer}"]
    attn, ffn = lp["attention"], lp["ffn"]
    values[f"layer_{layer}/resid_pre"] = x
    h = np_rms_norm(x, lp["attention_norm"]["scale"])
    q, k, v = (np.einsum("btd,dhk->bthk", h, attn[name]) for name in ("wq", "wk", "wv"))
    heads = np_causal_attention(np_rope(q), np_rope(k), v)
    x = x + np.einsum("bthk,hkd->btd", heads, attn["wo"])
    ffn_in = np_rms_norm(x, lp["ffn_norm"]["scale"])
    hidden = np_gelu(ffn_in @ ffn["wi"])
    out = hidden @ ffn["wo"]
    values.update({f"layer_{layer}/attention/heads": heads, f"layer_{layer}/resid_mid": x,
                   f"layer_{layer}/ffn/in": ffn_in, f"layer_{layer}/ffn/hidden": hidden,
                   f"layer_{layer}/ffn/out": out})
    x = x + out
    values[f"layer_{layer}/resid_post"] = x
  logits = np_rms_norm(x, p["final_norm"]["scale"]) @ p["embed"]["embedding"].T
  return values, logits


def test_site_paths_lists_every_marked_site_in_call_order(lm):
  model, _, tokens = lm
  want = [f"layer_{layer}/{site}" for layer in range(LAYERS) for site in BLOCK_SITES]
  assert sites.site_paths(model, tokens) == want


def test_collected_sites_and_logits_match_a_numpy_forward_pass(lm):
  model, variables, tokens = lm
  (logits, _), captured = sites.collect(model, variables, tokens, sites="*")
  want, want_logits = np_forward(variables["params"], tokens)
  assert list(captured) == list(want)
  for path, value in want.items():
    np.testing.assert_allclose(captured[path], value, rtol=1e-4, atol=1e-5, err_msg=path)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)


def test_resid_post_of_a_layer_is_resid_pre_of_the_next(lm):
  model, variables, tokens = lm
  _, captured = sites.collect(model, variables, tokens,
                              sites=["layer_0/resid_post", "layer_1/resid_pre"])
  np.testing.assert_array_equal(captured["layer_0/resid_post"], captured["layer_1/resid_pre"])


def test_glob_and_regex_patterns_select_sites(lm):
  model, _, tokens = lm
  assert sites.match_sites(model, tokens, sites="layer_*/ffn/hidden") == [
      "layer_0/ffn/hidden", "layer_1/ffn/hidden"]
  assert sites.match_sites(model, tokens, sites=r"layer_1/resid_(pre|post)") == [
      "layer_1/resid_pre", "layer_1/resid_post"]
  assert sites.match_sites(model, tokens, sites=["layer_1/resid_post", "layer_0/*/heads"]) == [
      "layer_0/attention/heads", "layer_1/resid_post"]


def test_collect_under_jit_matches_eager(lm):
  model, variables, tokens = lm
  run = lambda v, t: sites.collect(model, v, t, sites="layer_1/ffn/hidden")
  (eager_logits, _), eager = run(variables, tokens)
  (jit_logits, _), jitted = jax.jit(run)(variables, tokens)
  np.testing.assert_allclose(jitted["layer_1/ffn/hidden"], eager["layer_1/ffn/hidden"],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jit_logits, eager_logits, rtol=1e-6, atol=1e-6)


def test_identity_splice_leaves_logits_unchanged(lm):
  model, variables, tokens = lm
  logits, _ = model.apply(variables, tokens)
  spliced, _ = sites.splice(model, variables, tokens, fns={"*": lambda x: x})
  np.testing.assert_array_equal(spliced, logits)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_splicing_the_last_resid_post_gives_the_normed_head(lm, scale):
  model, variables, tokens = lm
  c_D = scale * np.random.default_rng(1).normal(size=D)
  logits, _ = sites.splice(model, variables, tokens,
                           fns={"layer_1/resid_post": lambda x: jnp.broadcast_to(c_D, x.shape)})
  params = jax.tree.map(np.asarray, variables["params"])
  want_V = np_rms_norm(c_D, params["final_norm"]["scale"]) @ params["embed"]["embedding"].T
  np.testing.assert_allclose(logits, np.broadcast_to(want_V, logits.shape), rtol=1e-5,
                             atol=1e-6)


def test_steering_resid_post_equals_steering_the_next_resid_pre(lm):
  model, variables, tokens = lm
  steer_D = np.random.default_rng(2).normal(size=D).astype(np.float32)
  add = lambda x: x + steer_D
  at_post, _ = sites.splice(model, variables, tokens, fns={"layer_0/resid_post": add})
  at_pre, _ = sites.splice(model, variables, tokens, fns={"layer_1/resid_pre": add})
  clean, _ = model.apply(variables, tokens)
  np.testing.assert_allclose(at_post, at_pre, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(at_post) - np.asarray(clean)).max() > 1e-3


def test_splice_composes_the_matching_fns_in_order(lm):
  model, variables, tokens = lm
  fns = {"layer_0/resid_mid": lambda x: 2 * x, "layer_0/*_mid": lambda x: x + 1}
  both, _ = sites.splice(model, variables, tokens, fns=fns)
  composed, _ = sites.splice(model, variables, tokens,
                             fns={"layer_0/resid_mid": lambda x: 2 * x + 1})
  np.testing.assert_array_equal(both, composed)


def test_a_pattern_matching_no_site_is_an_error_naming_the_sites(lm):
  model, variables, tokens = lm
  with pytest.raises(ValueError, match="'layer_2/resid_post' matches no site.*layer_1/resid_post"):
    sites.collect(model, variables, tokens, sites=["layer_0/resid_post", "layer_2/resid_post"])
  with pytest.raises(ValueError, match="'mlp/hidden' matches no site.*layer_0/ffn/hidden"):
    sites.splice(model, variables, tokens, fns={"mlp/hidden": lambda x: x})
  with pytest.raises(ValueError, match="'resid' matches no site"):
    sites.match_sites(model, tokens, sites="resid")


@pytest.mark.parametrize("bad", [[], 3, [""], ["layer_0/*", 1]])
def test_bad_patterns_are_errors(lm, bad):
  model, variables, tokens = lm
  with pytest.raises(ValueError, match="sites must be a site pattern"):
    sites.collect(model, variables, tokens, sites=bad)


def test_bad_fns_are_errors(lm):
  model, variables, tokens = lm
  with pytest.raises(ValueError, match="fns must be a non-empty dict"):
    sites.splice(model, variables, tokens, fns={})
  with pytest.raises(ValueError, match=r"fns\['\*'\] must be a function"):
    sites.splice(model, variables, tokens, fns={"*": 0.0})


def test_swiglu_hidden_site_is_the_gated_product():
  ffn = DenseFFN(d_model=D, d_ff=F, activation="swiglu")
  x_BTD = jnp.asarray(np.random.default_rng(3).normal(size=(2, T, D)), jnp.float32)
  variables = nn.meta.unbox(ffn.init(jax.random.key(1), x_BTD))
  _, captured = sites.collect(ffn, variables, x_BTD, sites="hidden")
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = np.asarray(x_BTD, np.float64)
  gate = x @ p["wi_gate"]
  want = gate / (1 + np.exp(-gate)) * (x @ p["wi"])
  np.testing.assert_allclose(captured["hidden"], want, rtol=1e-4, atol=1e-6)


class _Counter(nn.Module):
  """Counts its calls in the "stats" collection and passes x twice through one site."""

  @nn.compact
  def __call__(self, x):
    calls = self.variable("stats", "calls", lambda: jnp.zeros((), jnp.int32))
    calls.value += 1
    site = sites.Site(name="site")
    return site(site(x) + 1)


def test_collect_returns_mutated_state_and_each_call_of_a_repeated_site():
  model = _Counter()
  x = jnp.arange(3.0)
  variables = model.init(jax.random.key(0), x)
  (y, state), captured = sites.collect(model, variables, x, sites="site", mutable=["stats"])
  np.testing.assert_array_equal(y, x + 1)
  assert int(state["stats"]["calls"]) == 2  # one from init, one from this apply
  assert set(state) == {"stats"}
  first, second = captured["site"]
  np.testing.assert_array_equal(first, x)
  np.testing.assert_array_equal(second, x + 1)


def test_marking_sites_changes_neither_params_nor_the_jaxpr(lm, monkeypatch):
  model, variables, tokens = lm
  params = variables["params"]
  assert set(params["layer_0"]) == {"attention", "attention_norm", "ffn", "ffn_norm"}
  assert set(params["layer_0"]["attention"]) == {"wq", "wk", "wv", "wo"}
  assert set(params["layer_0"]["ffn"]) == {"wi", "wo"}
  assert set(variables) == {"params"}
  marked = str(jax.make_jaxpr(lambda v, t: model.apply(v, t))(variables, tokens))
  unmarked_site = lambda name: (lambda x: x)
  monkeypatch.setattr(model_layers, "Site", unmarked_site)
  monkeypatch.setattr(model_transformer, "Site", unmarked_site)
  assert str(jax.make_jaxpr(lambda v, t: model.apply(v, t))(variables, tokens)) == marked
