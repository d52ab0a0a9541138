"""Neuron statistics against hand counts and NumPy group-by references."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.activations import stats
from sparsejax.sites import Site


def test_counts_and_summary_match_a_hand_count():
  # Columns: never fires (dead), always fires, fires once, near zero except one token.
  acts_TF = np.array([[-1.0, 2.0, 0.0, 0.005],
                      [0.0, 0.5, 3.0, -0.005],
                      [-0.2, 1.0, -0.01, 0.5],
                      [9.0, -9.0, 9.0, 9.0]], np.float32)  # weight 0: padding, ignored
  w_T = np.array([1, 1, 1, 0], np.float32)
  state = stats.init_neuron_stats(4)
  state = stats.update_neuron_stats(state, acts_TF[:2], w_T[:2], eps=0.01)
  state = stats.update_neuron_stats(state, acts_TF[2:], w_T[2:], eps=0.01)
  s = stats.summarize(state)
  assert float(s["tokens"]) == 3
  np.testing.assert_allclose(s["firing_rate_F"], [0, 1, 1 / 3, 1 / 3])
  np.testing.assert_allclose(s["near_zero_rate_F"], [1 / 3, 0, 2 / 3, 2 / 3])
  assert int(s["dead"]) == 1 and int(s["always_on"]) == 1
  np.testing.assert_array_equal(s["dead_F"], [True, False, False, False])
  np.testing.assert_allclose(s["firing_fraction"], (0 + 1 + 1 / 3 + 1 / 3) / 4)
  np.testing.assert_allclose(s["near_zero_fraction"], (1 / 3 + 0 + 2 / 3 + 2 / 3) / 4)
  real = acts_TF[:3]
  np.testing.assert_allclose(s["mean_F"], real.mean(0), rtol=1e-6)
  np.testing.assert_allclose(s["std_F"], real.std(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s["max_F"], real.max(0))


def _binary_entropy(p):
  return -sum(q * np.log2(q) for q in (p, 1 - p) if q > 0)


def _adjusted_eta_sq(a_T, groups_T):
  """Adjusted between-group share of the variance, by an explicit group-by."""
  n, mean = len(a_T), a_T.mean()
  total = np.sum((a_T - mean) ** 2)
  labels = np.unique(groups_T)
  between = sum(np.sum(groups_T == g) * (a_T[groups_T == g].mean() - mean) ** 2 for g in labels)
  if total <= 1e-9:
    return 0.0
  eta = between / total
  return float(np.clip(1 - (1 - eta) * (n - 1) / (n - len(labels)), 0, 1)) if eta > 0 else 0.0


def test_positional_token_and_bigram_scores_match_numpy_group_bys():
  rng = np.random.default_rng(0)
  vocab, seq_len, windows = 4, 8, 6
  tokens_BT = rng.integers(0, vocab, (windows, seq_len))
  prev_BT = np.pad(tokens_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  pos_BT = np.broadcast_to(np.arange(seq_len), tokens_BT.shape)
  noise = rng.normal(size=(windows, seq_len, 4))
  acts_BTF = np.stack([np.array([-1.0, 0.5, 2.0, 0.1])[tokens_BT] + 0.1 * noise[..., 0],  # token
                       (pos_BT >= 4) * 1.0 + 0.05 * noise[..., 1] - 0.02,  # positional
                       tokens_BT * (prev_BT == 1) + 0.1 * noise[..., 2],  # bigram
                       noise[..., 3]], -1).astype(np.float32)
  buckets = 2
  state = stats.init_neuron_stats(4, num_positions=buckets, vocab_size=vocab,
                                  bigram_buckets=(vocab + 1) * vocab)
  bucket_BT = pos_BT * buckets // seq_len
  for half in (slice(0, 3), slice(3, 6)):
    state = stats.update_neuron_stats(
        state, acts_BTF[half].reshape(-1, 4), positions_T=bucket_BT[half].ravel(),
        token_ids_T=tokens_BT[half].ravel(), prev_token_ids_T=prev_BT[half].ravel(), eps=0.0)
  s = stats.summarize(state)
  a_TF = acts_BTF.reshape(-1, 4).astype(np.float64)
  pos_T, bigram_T = bucket_BT.ravel(), (prev_BT * 10 + tokens_BT).ravel()
  for f in range(4):
    fired_T = a_TF[:, f] > 0
    mi = _binary_entropy(fired_T.mean()) - sum(
        np.mean(pos_T == p) * _binary_entropy(fired_T[pos_T == p].mean()) for p in range(buckets))
    assert float(s["positional_score_F"][f]) == pytest.approx(mi, abs=1e-5)
    assert float(s["token_score_F"][f]) == pytest.approx(
        _adjusted_eta_sq(a_TF[:, f], tokens_BT.ravel()), abs=1e-4)
    assert float(s["bigram_score_F"][f]) == pytest.approx(
        _adjusted_eta_sq(a_TF[:, f], bigram_T), abs=1e-4)
  assert np.argmax(s["token_score_F"]) == 0 and np.argmax(s["positional_score_F"]) == 1
  assert s["bigram_score_F"][2] > 0.9 > s["token_score_F"][2]


def test_hashed_bigram_buckets_follow_the_formula():
  prev, cur = np.array([-1, 0, 5, 257]), np.array([3, 257, 0, 256])
  got = stats.bigram_buckets(jnp.asarray(prev), jnp.asarray(cur), 258, 4096)
  want = [((p + 1) * 258 + c) * 2654435761 % 2**32 % 4096 for p, c in zip(prev, cur)]
  np.testing.assert_array_equal(got, want)


def test_top_k_contexts_keep_the_largest_and_merge():
  rng = np.random.default_rng(1)
  acts_TF = rng.normal(size=(10, 3)).astype(np.float32)
  w_T = np.ones(10, np.float32)
  w_T[4] = 0.0  # padding never enters the top-k
  acts_TF[4] = 100.0
  contexts_T2 = np.stack([np.arange(10) // 5, np.arange(10) % 5], -1)
  init = stats.init_neuron_stats(3, top_k=3)
  first = stats.update_neuron_stats(init, acts_TF[:5], w_T[:5], contexts_T2=contexts_T2[:5])
  second = stats.update_neuron_stats(init, acts_TF[5:], w_T[5:], contexts_T2=contexts_T2[5:])
  sequential = stats.update_neuron_stats(first, acts_TF[5:], w_T[5:], contexts_T2=contexts_T2[5:])
  merged = stats.merge_neuron_stats(first, second)
  masked_TF = np.where(w_T[:, None] > 0, acts_TF, -np.inf)
  for state in (sequential, merged):
    for f in range(3):
      order = np.argsort(-masked_TF[:, f])[:3]
      np.testing.assert_allclose(state.top_acts_FK[f], masked_TF[order, f])
      np.testing.assert_array_equal(state.top_contexts_FK2[f], contexts_T2[order])
  np.testing.assert_allclose(merged.sum_F, sequential.sum_F, rtol=1e-6)
  np.testing.assert_allclose(merged.max_F, masked_TF.max(0))
  short = stats.update_neuron_stats(stats.init_neuron_stats(3, top_k=3), acts_TF[:2],
                                    contexts_T2=contexts_T2[:2])
  assert np.isneginf(short.top_acts_FK[:, 2]).all() and (short.top_contexts_FK2[:, 2] == -1).all()


class TinyLM(nn.Module):
  """Embed tokens, a ReLU hidden layer marked as a site, a readout."""

  @nn.compact
  def __call__(self, tokens_BT):
    x_BTD = nn.Embed(5, 3)(tokens_BT)
    h_BTF = Site(name="hidden")(nn.relu(nn.Dense(4)(x_BTD)))
    return nn.Dense(5)(h_BTF)


def test_collect_neuron_stats_on_a_tiny_model_matches_a_hand_count(tmp_path):
  model = TinyLM()
  tokens_BT = np.array([[0, 1, 2, 3], [4, 4, 1, 0], [2, 2, 2, 2]], np.int32)
  weights_BT = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens_BT)
  batches = [{"inputs": tokens_BT[:2], "weights": weights_BT[:2]},
             {"inputs": tokens_BT[2:], "weights": weights_BT[2:]}]
  out = stats.collect_neuron_stats(model, variables, batches, "hidden", eps=0.0,
                                   num_position_buckets=2, vocab_size=5, bigram_buckets=30,
                                   top_k=2)
  p = jax.tree.map(np.asarray, variables["params"])
  h_BTF = np.maximum(p["Embed_0"]["embedding"][tokens_BT] @ p["Dense_0"]["kernel"]
                     + p["Dense_0"]["bias"], 0)
  real = weights_BT.ravel() > 0
  h_TF = h_BTF.reshape(-1, 4)[real]
  state = out["hidden"]
  assert list(out) == ["hidden"] and float(state.tokens) == 11
  np.testing.assert_allclose(state.fired_F, (h_TF > 0).sum(0))
  np.testing.assert_allclose(state.sum_F, h_TF.sum(0), rtol=1e-5)
  late_fired_BTF = (h_BTF[:, 2:] > 0) * weights_BT[:, 2:, None]
  np.testing.assert_allclose(state.position_fired_PF[1], late_fired_BTF.sum((0, 1)))
  np.testing.assert_allclose(state.token_count_V, [1, 2, 5, 1, 2])
  window_T, position_T = np.divmod(np.flatnonzero(real), 4)
  best = np.argmax(h_TF, 0)
  np.testing.assert_array_equal(state.top_contexts_FK2[:, 0, 0], window_T[best])
  np.testing.assert_array_equal(state.top_contexts_FK2[:, 0, 1], position_T[best])
  stats.save_stats(str(tmp_path / "stats"), out, extra={"hidden": {"note": "x"}})
  loaded = stats.load_stats(str(tmp_path / "stats"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(out), strict=True):
    np.testing.assert_array_equal(a, b)
  summary = json.loads((tmp_path / "stats.json").read_text())["hidden"]
  assert summary["note"] == "x" and summary["tokens"] == 11
  assert summary["dead"] == int(np.sum((h_TF > 0).sum(0) == 0))
  assert len(summary["top_token"]) == 4


def test_missing_inputs_and_bad_shapes_are_clear_errors():
  state = stats.init_neuron_stats(3, num_positions=2)
  with pytest.raises(ValueError, match="positions_T"):
    stats.update_neuron_stats(state, jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"allowed: \[T, 3\]"):
    stats.update_neuron_stats(state, jnp.zeros((4, 2)), positions_T=jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match="bigram_buckets=8 needs vocab_size"):
    stats.init_neuron_stats(3, bigram_buckets=8)
  with pytest.raises(ValueError, match="top_k=-1"):
    stats.init_neuron_stats(3, top_k=-1)
