"""Layer lottery on a tiny LM: block scores vs a NumPy sum, the lowest blocks chosen, and the
shallow LM built from the dropped params equal to the deep LM with those blocks silenced."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.masks.layer_lottery import (block_scores, blocks_to_drop, drop_blocks,
                                           kept_layer_indices)
from sparsejax.masks.mask import leaves_by_path
from sparsejax.models.transformer import TransformerLM

TINY = dict(vocab_size=16, d_model=8, num_heads=2, d_ff=16, max_len=8)


@pytest.fixture(scope="module")
def lm():
  tokens_BT = jax.random.randint(jax.random.key(1), (2, 8), 0, 16)
  model = TransformerLM(**TINY, num_layers=3)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens_BT))["params"]

  def loss(p):
    logits_BTV, _ = model.apply({"params": p}, tokens_BT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1],
                                                           tokens_BT[:, 1:]).mean()

  return tokens_BT, params, jax.jit(jax.grad(loss))(params)


def _numpy_scores(params, grads, score):
  totals = np.zeros(3)
  ws, gs = leaves_by_path(params), leaves_by_path(grads)
  for path, w in ws.items():
    if path.startswith("layer_"):
      w, g = np.asarray(w, np.float64), np.asarray(gs[path], np.float64)
      term = np.abs(w * g).sum() if score == "snip" else (g**2).sum()
      totals[int(path.split("/")[0][6:])] += term
  return totals if score == "snip" else np.sqrt(totals)


@pytest.mark.parametrize("score", ["snip", "grad_norm"])
def test_block_scores_and_choice_match_numpy(lm, score):
  _, params, grads = lm
  want = _numpy_scores(params, grads, score)
  got = block_scores(params, grads, score)
  assert list(got) == [0, 1, 2]
  np.testing.assert_allclose([got[b] for b in range(3)], want, rtol=1e-5)
  assert blocks_to_drop(params, grads, 2, score) == tuple(sorted(np.argsort(want)[:2]))


def test_dropped_lm_equals_the_deep_lm_with_silenced_blocks(lm):
  tokens_BT, params, _ = lm
  silenced = jax.tree.map(lambda x: x, params)
  for name in ("attention", "ffn"):  # zero output projections: block 1 adds nothing
    silenced["layer_1"][name]["wo"] = jnp.zeros_like(params["layer_1"][name]["wo"])
  deep, _ = TransformerLM(**TINY, num_layers=3).apply({"params": silenced}, tokens_BT)
  shallow_params = drop_blocks(params, [1])
  assert sorted(k for k in shallow_params if k.startswith("layer_")) == ["layer_0", "layer_1"]
  assert shallow_params["layer_1"] is params["layer_2"]
  shallow, _ = TransformerLM(**TINY, num_layers=2).apply({"params": shallow_params}, tokens_BT)
  np.testing.assert_allclose(shallow, deep, rtol=1e-5, atol=1e-5)


def test_kept_layer_indices_and_errors(lm):
  assert kept_layer_indices((0, 2, 3), dropped=(1, 3), num_layers=4) == (0, 1)
  assert kept_layer_indices(None, dropped=(1,), num_layers=4) is None
  _, params, grads = lm
  with pytest.raises(ValueError, match="dropped blocks \\[5\\]"):
    drop_blocks(params, [5])
  with pytest.raises(ValueError, match="num_drop must be in \\[0, 3\\)"):
    blocks_to_drop(params, grads, 3)
