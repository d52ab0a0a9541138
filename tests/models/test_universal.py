"""Tests for the Sparse Universal Transformer LM against naive loops over its one shared block."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sparsejax
from sparsejax.models import DecoderBlock, build_lm
from sparsejax.models.universal import halt_step, mix_halted, start_halting

TINY = dict(d_model=8, num_layers=3, num_heads=2, d_ff=16, max_len=6)
VOCAB = 11


def _lm(**architecture):
  config = ml_collections.ConfigDict({**TINY, "architecture": {"name": "universal", **architecture}})
  return build_lm(config, vocab_size=VOCAB)


def _init(model, tokens):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens))["params"]


_BLOCK = DecoderBlock(d_model=TINY["d_model"], num_heads=TINY["num_heads"], d_ff=TINY["d_ff"],
                      positions="rope", ffn="dense", ffn_kwargs=(), attention="dense",
                      attention_kwargs=(), dtype=jnp.float32)
_apply_block = jax.jit(lambda p, x: _BLOCK.apply({"params": p}, x)[0])


def _naive_block(params, x):
  """The shared block applied once, as a standalone DecoderBlock with the model's params."""
  return np.asarray(_apply_block(params["shared_block"], jnp.asarray(x, jnp.float32)))


def _naive_logits(params, x):
  """RMSNorm then the tied head, in NumPy."""
  x = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * params["final_norm"]["scale"]
  return x @ np.asarray(params["embed"]["embedding"]).T


def test_halt_step_stick_breaking_weights_hand_worked():
  # alpha = 0.5, 0.2, 0.5 on states e_1, e_2, e_3 (steps 1..3), then the block output e_4:
  # p = 0.5, 0.5 * 0.8 * ... -> p_1 = 0.5, p_2 = 0.2 * 0.5 = 0.1, p_3 = 0.5 * 0.4 = 0.2,
  # remainder r = 0.5 * 0.8 * 0.5 = 0.2; weights sum to 1; E[depth] = 0.5 + 0.2 + 0.6 + 4 * 0.2.
  eye = np.eye(4, dtype=np.float32)[:, None, None, :]  # state j is the one-hot e_j, B = T = 1
  state = start_halting(jnp.zeros((1, 1, 4)))
  for step, alpha in zip((1, 2, 3), (0.5, 0.2, 0.5)):
    state = halt_step(state, jnp.full((1, 1), alpha), jnp.asarray(eye[step - 1]), step)
  mixed = np.asarray(mix_halted(state, jnp.asarray(eye[3])))[0, 0]
  np.testing.assert_allclose(mixed, [0.5, 0.1, 0.2, 0.2], atol=1e-7)
  assert mixed.sum() == pytest.approx(1.0)
  assert float(state.remaining_BT[0, 0]) == pytest.approx(0.2)
  assert float(state.depth_BT[0, 0]) + 4 * 0.2 == pytest.approx(0.5 + 0.2 + 0.6 + 0.8)


def test_without_halting_equals_the_block_applied_num_layers_times():
  model = _lm(halting=False)
  tokens = jnp.asarray([[1, 5, 3, 9, 2, 7]])
  params = _init(model, tokens)
  logits, aux = jax.jit(model.apply)({"params": params}, tokens)
  x = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)]
  for _ in range(TINY["num_layers"]):
    x = _naive_block(params, x)
  np.testing.assert_allclose(logits, _naive_logits(params, x), rtol=2e-5, atol=2e-5)
  assert aux["losses"] == {} and "halting_gate" not in params


def test_halting_matches_a_naive_stick_breaking_loop_and_has_finite_grads():
  """alpha_l from the gate, p_l = alpha_l prod_{j<l}(1 - alpha_j), state frozen once the
  remaining mass is below 1 - threshold, the ponder loss = weight * mean E[depth]."""
  model = _lm(halt_threshold=0.9, ponder_weight=0.5)
  tokens = jnp.asarray([[4, 1, 8, 8, 0, 3]])
  params = _init(model, tokens)
  gate = dict(params["halting_gate"])
  gate["w2"] = jax.random.normal(jax.random.PRNGKey(3), gate["w2"].shape)
  gate["b2"] = jnp.float32(1.5)  # large alphas, so some tokens halt before the last step
  params = {**params, "halting_gate": gate}

  def loss(p):
    logits, aux = model.apply({"params": p}, tokens)
    nll = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return nll + sparsejax.total_aux_loss(aux), (logits, aux)

  (_, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["halting_gate"]["w2"]).sum()) > 0

  def alpha(h):
    hidden = h @ np.asarray(gate["w1"]) + np.asarray(gate["b1"])
    hidden = np.asarray(jax.nn.gelu(jnp.asarray(hidden), approximate=True))
    return 1 / (1 + np.exp(-(hidden @ np.asarray(gate["w2"]) + 1.5)))

  h = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)].astype(np.float64)
  states, alphas, halted_any = [h], [], False
  h = _naive_block(params, h)
  for step in range(1, TINY["num_layers"]):
    states.append(h)
    alphas.append(alpha(h))
    weights = [alphas[j] * np.prod([1 - a for a in alphas[:j]], axis=0) for j in range(step)]
    remaining = np.prod([1 - a for a in alphas], axis=0)
    new = sum(w[..., None] * s for w, s in zip(weights, states[1:])) + (
        remaining[..., None] * _naive_block(params, h))
    halted = remaining < 1 - 0.9
    halted_any |= bool(halted.any())
    h = np.where(halted[..., None], h, new)
  depth = sum(l * w for l, w in zip(range(1, TINY["num_layers"]), weights)) + (
      TINY["num_layers"] * remaining)
  assert halted_any
  np.testing.assert_allclose(logits, _naive_logits(params, h), rtol=1e-4, atol=1e-4)
  assert float(aux["losses"]["halting/ponder"]) == pytest.approx(0.5 * depth.mean(), rel=1e-5)
  assert float(aux["metrics"]["halting/expected_depth"]) == pytest.approx(depth.mean(), rel=1e-5)


def test_universal_rejects_ffn_layers():
  with pytest.raises(ValueError, match="ffn_layers must be None"):
    build_lm(ml_collections.ConfigDict({**TINY, "ffn_layers": (0,),
                                        "architecture": {"name": "universal"}}), VOCAB)


def test_token_by_token_decoding_rejects_the_universal_lm():
  from sparsejax.models import decoding
  with pytest.raises(ValueError, match="UniversalLM cannot be decoded token by token"):
    decoding.check_decodable(_lm())
