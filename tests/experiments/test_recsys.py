"""Embedding-bag click model and the "recsys" task: bags vs a naive loop, AUC by hand, the
synthetic data's determinism, and sparse tables trained with RigL through the trainer."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from experiments import trainer as trainer_lib
from experiments.configs import recsys as recsys_config
from experiments.data import synthetic_clicks
from experiments.tasks import recsys
from sparsejax import masks
from sparsejax import models

M32 = 0xFFFFFFFF


def py_row(raw_id, field, num_rows):
  """murmur3's finaliser of id ^ (field + 1) * golden, with Python ints."""
  h = (raw_id & M32) ^ (((field + 1) * 0x9E3779B9) & M32)
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return (h ^ (h >> 16)) % num_rows


def test_dlrm_matches_a_naive_loop():
  ids = np.array([[[5, 17, -1], [3, -1, -1], [-1, -1, -1]],
                  [[123456, 5, 5], [9, 8, 7], [2, -1, -1]]], np.int32)
  model = models.build_classifier({"name": "dlrm", "num_rows": (7, 11, 5), "embed_dim": 4,
                                   "hidden": (6,), "pooling": "mean"}, num_classes=1)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), ids)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), nn.meta.unbox(variables["params"]))
  tables = [p[f"table_{f}"] for f in range(3)]
  pooled = np.zeros((2, 3, 4))
  for b in range(2):
    for f in range(3):
      present = [int(i) for i in ids[b, f] if i >= 0]
      for i in present:
        pooled[b, f] += tables[f][py_row(i, f, tables[f].shape[0])] / len(present)
  dots = np.array([[pooled[b, f] @ pooled[b, g] for f in range(3) for g in range(f + 1, 3)]
                   for b in range(2)])
  h = np.maximum(np.concatenate([pooled.reshape(2, -1), dots], 1) @ p["layer_0"]["kernel"]
                 + p["layer_0"]["bias"], 0)
  logits = h @ p["head"]["kernel"] + p["head"]["bias"]
  got, aux = jax.jit(model.apply)(variables, ids)
  np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-6)
  assert set(aux) == {"losses", "metrics"}
  with pytest.raises(ValueError, match="num_rows=\\(7, 11\\) must be a positive int or one per"):
    jax.eval_shape(models.build_classifier({"name": "dlrm", "num_rows": (7, 11)}, 1).init,
                   jax.random.PRNGKey(0), ids)


def test_auc_hand_worked():
  # Positives at 0.35 and 0.8, negatives at 0.1 and 0.4: pairs won 1 + 2 of 4 -> 0.75. A
  # weight-0 (padding) example at p = 0.9 changes nothing.
  probs = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
  logits, clicks = np.log(probs / (1 - probs)), np.array([0, 0, 1, 1, 0])
  hist = jax.jit(recsys.click_histograms)(logits, clicks, np.array([1.0, 1, 1, 1, 0]))
  assert recsys.histogram_auc(*hist) == 0.75
  assert synthetic_clicks.exact_auc(probs[:4], clicks[:4]) == 0.75
  # A tie counts one half: 0.5 twice (one of each) and a positive above both -> (1 + 0.5) / 2.
  assert recsys.histogram_auc(np.array([0, 1, 1]), np.array([0, 1, 0])) == 0.75
  assert synthetic_clicks.exact_auc([0.5, 0.5, 0.9], [1, 0, 1]) == 0.75


def test_synthetic_clicks_are_deterministic():
  a, b = synthetic_clicks.generate(300), synthetic_clicks.generate(300)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  ids, clicks, p = a
  assert ids.shape == (300, synthetic_clicks.NUM_FIELDS, synthetic_clicks.BAG_SIZE)
  present = ids >= 0
  assert present[:, :, 0].all() and ids.max() < synthetic_clicks.CARDINALITY
  assert np.all(present[:, :, 1:] <= present[:, :, :-1])  # empty slots only at the end
  assert 0.2 < clicks.mean() < 0.6 and synthetic_clicks.exact_auc(p, clicks) > 0.8
  assert not np.array_equal(synthetic_clicks.generate(300, seed=1)[0], ids)
  with pytest.raises(ValueError, match="split='validation' does not exist"):
    synthetic_clicks.load_clicks("validation")


def test_sparse_tables_train_with_rigl_through_the_trainer(tmp_path, monkeypatch):
  monkeypatch.setattr(synthetic_clicks, "NUM_TRAIN", 256)
  monkeypatch.setattr(synthetic_clicks, "NUM_TEST", 64)
  synthetic_clicks._all.cache_clear()
  c = recsys_config.get_config("rigl")
  c.classifier = ml_collections.ConfigDict({"name": "dlrm", "num_rows": 32, "embed_dim": 4,
                                            "hidden": (8,)})
  c.train.update(num_steps=4, batch_size=32, log_every=4, eval_every=4, warmup_steps=1)
  c.sparsity.schedule.update(end=4, update_every=2)
  c.checkpoint.every, c.mesh.data = 4, 1
  t = trainer_lib.Trainer(c, str(tmp_path), jax.devices()[:1])
  try:
    summary = t.run()
    final = masks.get_mask(jax.device_get(t.state["opt_state"])).flat()
    initial = t.initial_mask.flat()
  finally:
    t.close()
    synthetic_clicks._all.cache_clear()
  densities = {path: float(np.mean(m)) for path, m in final.items()}
  assert all(abs(densities[f"table_{f}"] - 0.1) < 0.01 for f in range(8))
  assert densities["layer_0/kernel"] == 1.0 and 0.0 <= summary["eval/auc"] <= 1.0
  assert any(not np.array_equal(final[f"table_{f}"], initial[f"table_{f}"]) for f in range(8))
