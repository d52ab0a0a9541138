"""Sparse memory finetuning: TF-IDF by hand, frozen rows bit-identical, read counts vs naive."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sparsejax.memory import finetune, pkm
from sparsejax.models import build_lm
from tests.memory import reference
from tests.memory.test_layer import np_norm


def test_tfidf_matches_a_hand_worked_case():
  new_counts = np.array([3.0, 1.0, 0.0, 4.0])
  background = np.array([[1, 0, 0, 2],   # df = [2, 0, 1, 3] over D = 3 documents
                         [0, 0, 5, 1],
                         [2, 0, 0, 3]])
  # tf = c / 8; idf = log(4 / (1 + df)).
  want = [3 / 8 * np.log(4 / 3), 1 / 8 * np.log(4), 0.0, 4 / 8 * np.log(1)]
  scores = finetune.tfidf_scores(new_counts, background)
  np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(finetune.document_frequency(background), [2, 0, 1, 3])
  # Slot 1 (never read in the background) outranks slot 0; slot 3 (read everywhere) scores 0.
  np.testing.assert_array_equal(finetune.top_slots(scores, 2), [1, 0])


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match=r"t must be an int in \[1, N=4\], got 5"):
    finetune.top_slots(jnp.zeros(4), 5)
  with pytest.raises(ValueError, match=r"background_counts must have shape \(D, N=4\)"):
    finetune.tfidf_scores(jnp.zeros(4), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"not params"):
    finetune.masks_for({"a": jnp.zeros((4, 2))}, {"b/values": jnp.array([0])})


def test_slot_counts_is_a_histogram():
  idx = np.array([[[0, 3], [3, 3]], [[1, 0], [2, 3]]])
  np.testing.assert_array_equal(finetune.slot_counts(idx, 5), np.bincount(idx.ravel(), minlength=5))


def params_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "layer_1": {"ffn": {"values": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
                          "query": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}},
      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }


def make_inner():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.1))


@pytest.mark.parametrize("train_other", [False, True])
def test_only_the_chosen_rows_move_and_match_adamw_on_them_alone(train_other):
  params = params_tree()
  # A frozen -0.0 must stay -0.0 (an update of +0.0 would flip its sign bit).
  params["layer_1"]["ffn"]["values"] = params["layer_1"]["ffn"]["values"].at[0, 0].set(-0.0)
  slots = jnp.array([2, 5, 11])
  masks = finetune.masks_for(params, {"layer_1/ffn/values": slots}, train_other=train_other)
  tx = finetune.sparse_update(make_inner(), masks)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  # Naive reference: AdamW (same clip) on a tree holding just the trained entries.
  sub = {"rows": params["layer_1"]["ffn"]["values"][slots]}
  if train_other:
    sub.update(query=params["layer_1"]["ffn"]["query"], bias=params["bias"])
  ref_tx = make_inner()
  ref_state = ref_tx.init(sub)
  rng = np.random.default_rng(1)
  new = params
  for _ in range(4):  # gradients non-zero everywhere, frozen rows included
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    new, state = step(new, state, grads)
    sub_grads = {"rows": grads["layer_1"]["ffn"]["values"][slots]}
    if train_other:
      sub_grads.update(query=grads["layer_1"]["ffn"]["query"], bias=grads["bias"])
    updates, ref_state = ref_tx.update(sub_grads, ref_state, sub)
    sub = optax.apply_updates(sub, updates)

  values, old_values = np.asarray(new["layer_1"]["ffn"]["values"]), params["layer_1"]["ffn"]["values"]
  frozen = np.setdiff1d(np.arange(16), slots)
  np.testing.assert_array_equal(values[frozen].view(np.uint32),
                                np.asarray(old_values)[frozen].view(np.uint32))  # bit-identical
  np.testing.assert_allclose(values[np.asarray(slots)], sub["rows"], rtol=1e-5, atol=1e-6)
  assert np.all(values[np.asarray(slots)] != np.asarray(old_values)[np.asarray(slots)])
  for path in (("layer_1", "ffn", "query"), ("bias",)):
    got, old = new, params
    for name in path:
      got, old = got[name], old[name]
    if train_other:
      want = sub[path[-1]]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(got, old)


def lm(shared):
  config = ml_collections.ConfigDict(dict(
      d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=8,
      ffn={"name": "pkm", "num_keys": 6, "k": 3, "num_heads": 2, "d_key": 8},
      shared_memory_values=shared,
  ))
  return build_lm(config, vocab_size=32)


def naive_layer_idx(x_TD, layer_params, k):
  """Slots a memory layer reads, recomputed from its input with the naive dense top-k."""
  q = np.einsum("td,dhq->thq", np.asarray(x_TD, np.float64), layer_params["query"])
  q = np_norm(q, layer_params["query_norm"], "layernorm")
  _, idx, _ = reference.naive_read(jnp.asarray(q, jnp.float32), layer_params["subkeys"],
                                   jnp.zeros((36, 1)), k)
  return np.asarray(idx)


@pytest.mark.parametrize("shared", [False, True])
def test_access_counts_match_a_naive_recount(shared):
  model = lm(shared)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (3, 8)), jnp.int32)
  variables = nn.meta.unbox(model.init(jax.random.key(0), tokens))
  counts = jax.jit(lambda v, t: finetune.access_counts(model, v, t))(variables, tokens)
  _, inter = model.apply(variables, tokens, capture_intermediates=True)
  inter = inter["intermediates"]
  params = variables["params"]
  want = {}
  for layer in ("layer_0", "layer_1"):
    x_TD = inter[layer]["ffn_norm"]["__call__"][0].reshape(-1, 16)
    idx = naive_layer_idx(x_TD, params[layer]["ffn"], 3)
    table = "shared_memory_values" if shared else f"{layer}/ffn/values"
    want[table] = want.get(table, 0) + np.bincount(idx.ravel(), minlength=36)
  assert set(counts) == set(want)
  for table, value in want.items():
    np.testing.assert_array_equal(counts[table], value, err_msg=table)


def test_window_metrics_of_summed_histograms_match_numpy():
  rng = np.random.default_rng(0)
  idx = [rng.integers(0, 20, (5, 2, 3)) for _ in range(2)]
  weights = [rng.uniform(size=(5, 2, 3)) for _ in range(2)]
  hists = [pkm.slot_histograms(jnp.asarray(i), jnp.asarray(w), 20) for i, w in zip(idx, weights)]
  summed = jax.tree.map(jnp.add, *hists)
  metrics = finetune.window_metrics({"layer_1/ffn": summed}, prefix="eval/", top=3)
  all_idx, all_w = np.concatenate([i.ravel() for i in idx]), np.concatenate([w.ravel() for w in weights])
  mass = np.bincount(all_idx, weights=all_w, minlength=20)
  p = mass / mass.sum()
  nz = p[p > 0]
  np.testing.assert_allclose(metrics["eval/layer_1/ffn/memory_usage"],
                             np.mean(np.bincount(all_idx, minlength=20) > 0))
  np.testing.assert_allclose(metrics["eval/layer_1/ffn/access_entropy"],
                             -np.sum(nz * np.log(nz)) / np.log(20), rtol=1e-5)
  np.testing.assert_allclose(metrics["eval/layer_1/ffn/top_slot_share"], p.max(), rtol=1e-5)
  np.testing.assert_array_equal(metrics["eval/layer_1/ffn/top_slots"], np.argsort(-p)[:3])
