"""KV-cache decoding of the TransformerLM against the model's own full-sequence forward pass."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.attention import decode  # importing sparsejax.attention registers "entmax"
from sparsejax.models import TransformerLM, decoding

importlib.import_module("sparsejax.moe")  # registers "hash_moe"

TINY = dict(vocab_size=40, d_model=16, num_layers=3, num_heads=2, d_ff=32, max_len=12)


def _lm(**overrides):
  model = TransformerLM(**{**TINY, **overrides})
  tokens = jax.random.randint(jax.random.key(1), (2, TINY["max_len"]), 0, TINY["vocab_size"])
  return model, model.init(jax.random.key(0), tokens), tokens


@pytest.mark.parametrize("overrides", [
    {},
    {"positions": "learned", "tie_embeddings": False, "ffn_kwargs": (("activation", "swiglu"),)},
])
def test_teacher_forced_decoding_equals_the_full_forward_pass(overrides):
  model, variables, tokens = _lm(**overrides)
  want, _ = model.apply(variables, tokens)
  run = jax.jit(lambda v, t: decoding.teacher_forced(model, v, t, prompt_len=2))
  logits, fraction = run(variables, tokens)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(fraction, np.ones(TINY["max_len"]))


def test_budget_of_the_whole_cache_decodes_exactly_as_full_attention():
  model, variables, tokens = _lm()
  run = jax.jit(lambda v, t, selection: decoding.teacher_forced(
      model, v, t, selection=selection, budget=TINY["max_len"], page_size=4),
                static_argnums=2)
  full, _ = run(variables, tokens, "full")
  for selection in ("topk", "pages"):
    np.testing.assert_array_equal(run(variables, tokens, selection)[0], full)


def test_attended_fraction_per_step_and_tidal_reuse():
  model, variables, tokens = _lm()
  budget = 4
  plan = decode.selection_plan(3, "tidal", num_full=1)  # full, select, reuse
  _, fraction = jax.jit(lambda v, t: decoding.teacher_forced(
      model, v, t, plan=plan, selection="topk", budget=budget))(variables, tokens)
  context = np.arange(1, TINY["max_len"] + 1)  # tokens cached when predicting position t
  # Only the reuse layer is sparse: it attends to min(budget, n) of n tokens.
  np.testing.assert_allclose(fraction, (2 + np.minimum(budget, context) / context) / 3,
                             rtol=1e-6)


def test_greedy_generation_continues_with_the_models_argmax():
  model, variables, tokens = _lm()
  prompt = tokens[:, :4]
  new, fraction = jax.jit(lambda v, p: decoding.generate(model, v, p, 8))(variables, prompt)
  sequence = jnp.concatenate([prompt, new], axis=1)
  logits, _ = model.apply(variables, sequence)
  np.testing.assert_array_equal(new, np.argmax(logits[:, 3:-1], -1))
  np.testing.assert_array_equal(fraction, np.ones(8))
  with pytest.raises(ValueError, match=r"num_new_tokens=10 must be >= 1 with prompt length 4"):
    decoding.generate(model, variables, prompt, 10)


def test_teacher_forcing_more_tokens_than_the_cache_holds_is_a_clear_error():
  with pytest.raises(ValueError, match=r"tokens length 13 exceeds max_len=12, the KV cache's"):
    decoding.teacher_forced(TransformerLM(**TINY), {}, jnp.zeros((1, 13), jnp.int32))


@pytest.mark.parametrize("overrides, message", [
    ({"attention": "entmax"}, r"attention='entmax' cannot be decoded with a KV cache; allowed: "
                              r"dense, block_sparse"),
    ({"ffn": "hash_moe", "ffn_kwargs": (("num_experts", 2),)},
     r"ffn='hash_moe' declares takes_token_ids"),
])
def test_undecodable_models_are_clear_errors(overrides, message):
  model = TransformerLM(**{**TINY, **overrides})
  with pytest.raises(ValueError, match=message):
    decoding.prefill(model, {}, jnp.zeros((1, 2), jnp.int32))


def test_a_reuse_layer_attends_exactly_to_the_positions_its_select_layer_chose(monkeypatch):
  model, variables, tokens = _lm()
  budget = 3
  _, cache = decoding.prefill(model, variables, tokens[:, :6])
  chosen, reused = [], []
  select, attend = decode.select, decode.attend

  def recording_select(*args, **kwargs):
    chosen.append(select(*args, **kwargs))
    return chosen[-1]

  def recording_attend(q_BHK, cache, layer, selection="full", budget=None, reuse_idx=None,
                       **kwargs):
    out = attend(q_BHK, cache, layer, selection, budget, reuse_idx, **kwargs)
    if layer == 2:
      reused.append((reuse_idx, cache, q_BHK, out[0]))
    return out

  monkeypatch.setattr(decode, "select", recording_select)
  monkeypatch.setattr(decode, "attend", recording_attend)
  decoding.decode_step(model, variables, cache, tokens[:, 6], ("full", "select", "reuse"),
                       "topk", budget)
  (idx_BHN,), ((reuse_idx, cache, q_BHK, o_BHK),) = chosen, reused
  np.testing.assert_array_equal(reuse_idx, idx_BHN)
  # Softmax attention of layer 2's query over exactly those cached positions, in NumPy.
  k_BHSK, v_BHSK = np.asarray(cache.k_LBHSK[2]), np.asarray(cache.v_LBHSK[2])
  q_BHK, idx_BHN = np.asarray(q_BHK), np.asarray(idx_BHN)
  for b in range(q_BHK.shape[0]):
    for h in range(q_BHK.shape[1]):
      keys, values = k_BHSK[b, h, idx_BHN[b, h]], v_BHSK[b, h, idx_BHN[b, h]]
      scores = keys @ q_BHK[b, h] / np.sqrt(q_BHK.shape[-1])
      p = np.exp(scores - scores.max())
      np.testing.assert_allclose(o_BHK[b, h], p @ values / p.sum(), rtol=1e-5, atol=1e-6)
