"""The trainer's classification task and sparse training: metrics against numpy references,
exact densities and zeros, masks through checkpoints and mesh changes, clear config errors."""
import jax
import ml_collections
import numpy as np
import pytest

from experiments import metrics as metrics_lib
from experiments import trainer as trainer_lib
from experiments.claims import sparse_mlp as claims
from experiments.configs import sparse_mlp
from experiments.data import digits
from sparsejax import masks


def tiny_config(method="rigl", **train):
  c = sparse_mlp.get_config(method)
  c.classifier = ml_collections.ConfigDict({"name": "mlp", "hidden": (32, 16)})
  c.train.update(num_steps=8, batch_size=16, log_every=2, eval_every=4, warmup_steps=2,
                 learning_rate=1e-2)
  c.train.update(train)
  c.checkpoint.every = 4
  c.mesh.data = 1
  c.sparsity.density = 0.2
  if method in ("set", "rigl", "srigl"):
    c.sparsity.schedule.update(end=8, update_every=2)
  return c


def trainer_for(config, workdir, devices=1):
  return trainer_lib.Trainer(config, str(workdir), jax.devices()[:devices])


def run(config, workdir, devices=1, stop_at_step=None):
  """The final state (host arrays) of one trainer run."""
  t = trainer_for(config, workdir, devices)
  try:
    t.run(stop_at_step)
    return jax.device_get(t.state)
  finally:
    t.close()


def numpy_eval(params, split):
  """(mean NLL, accuracy) of the ReLU MLP `params` on `split`, in float64 numpy."""
  h = split.inputs.astype(np.float64)
  for name in ("layer_0", "layer_1"):
    h = np.maximum(h @ params[name]["kernel"] + params[name]["bias"], 0.0)
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -log_probs[np.arange(len(split.labels)), split.labels].mean()
  return nll, np.mean(np.argmax(logits, -1) == split.labels)


def _mask_counts(mask):
  return {path: int(np.sum(m)) for path, m in mask.flat().items()}


def test_dense_classifier_has_no_mask(tmp_path):
  t = trainer_for(tiny_config("dense"), tmp_path)
  assert t.initial_mask is None and t.config.task == "classify" and t.task.unit == "examples"
  t.close()


def test_rigl_keeps_exact_density_and_zeros_and_eval_matches_numpy(tmp_path):
  config = tiny_config("rigl", log_every=1)
  t = trainer_for(config, tmp_path)
  initial = t.initial_mask
  t.run()
  state = jax.device_get(t.state)
  t.close()
  mask = masks.get_mask(state["opt_state"])
  kernels = ["head/kernel", "layer_0/kernel", "layer_1/kernel"]
  assert sorted(mask.sparse_paths()) == kernels  # biases stay dense
  sizes = {"layer_0/kernel": 64 * 32, "layer_1/kernel": 32 * 16, "head/kernel": 16 * 10}
  target = round(0.2 * sum(sizes.values()))
  assert sum(_mask_counts(initial)[p] for p in kernels) == target
  assert _mask_counts(mask) == _mask_counts(initial)  # swaps keep every leaf's count
  assert any(np.any(np.asarray(a) != np.asarray(b))  # and RigL did swap
             for a, b in zip(jax.tree.leaves(mask.leaves), jax.tree.leaves(initial.leaves)))
  for w, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(mask.leaves)):
    assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)  # masked weights exactly zero
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == list(range(1, 9))
  for r in records[1:]:  # a classifier counts examples, not tokens
    assert "tokens_per_sec" not in r
    assert r["examples_per_sec"] == pytest.approx(r["steps_per_sec"] * 16)
  for r in records:
    assert r["density/global"] == pytest.approx(target / sum(sizes.values()), abs=1e-7)
    for path in kernels:
      assert r[f"density/{path}"] == pytest.approx(_mask_counts(initial)[path] / sizes[path],
                                                   abs=1e-7)
  evals = [r for r in records if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [4, 8]
  nll, accuracy = numpy_eval(state["params"], digits.load_digits("test"))  # zeros: masked
  assert evals[-1]["eval/accuracy"] == pytest.approx(accuracy, abs=1e-9)
  assert evals[-1]["eval/loss"] == pytest.approx(nll, rel=1e-5)
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]


def test_masks_survive_checkpoint_restore_and_mesh_change(tmp_path):
  sharded = tiny_config("set")
  sharded.mesh.update(data=2, fsdp=2, model=2)
  t = trainer_for(sharded, tmp_path, devices=8)
  t.run(stop_at_step=4)  # SET swapped at steps 0 and 2
  saved_state = t.state
  mask_shardings = t.state_shardings["opt_state"].mask.leaves
  assert jax.tree.map(lambda s: s.spec, mask_shardings) == jax.tree.map(
      lambda s: s.spec, t.state_shardings["params"])  # masks shard like their params
  saved = jax.device_get(masks.get_mask(saved_state["opt_state"]))
  t.close()
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
             zip(jax.tree.leaves(saved.leaves), jax.tree.leaves(t.initial_mask.leaves)))

  t = trainer_for(tiny_config("set"), tmp_path, devices=1)  # restore on one device
  state = t.restore_or_init()
  restored = masks.get_mask(state["opt_state"])
  advanced = t._train_iterator(t.rows)
  for _ in range(4):
    next(advanced)
  assert t.data.get_state() == advanced.get_state() and restored.structures == saved.structures
  for a, b in zip(jax.tree.leaves(restored.leaves), jax.tree.leaves(saved.leaves)):
    assert a.dtype == np.bool_
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  t.run()  # continues to step 8 from the restored mask
  final = jax.device_get(t.state)
  t.close()
  assert _mask_counts(masks.get_mask(final["opt_state"])) == _mask_counts(saved)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update({"task": "regress"}), "config.task='regress'; allowed: classify, forecast, lm, recsys, sae"),
    (lambda c: c.data.update(name="python_stdlib"), "'python_stdlib' is not a classification"),
    (lambda c: c.classifier.update(name="nope"), "unknown model 'nope'"),
    (lambda c: c.sparsity.update(density=0.0), r"density=0.0.*\(0, 1\]"),
    (lambda c: c.sparsity.update(init="snap"), "config.sparsity.init: unknown mask init 'snap'; "
                                               "allowed: fisher, magnitude, random, saliency"),
    (lambda c: c.sparsity.update(init="fisher", init_batches=0), "init_batches=0 must be >= 1"),
    (lambda c: c.sparsity.updater.update(name="nope"), "unknown mask updater 'nope'"),
    (lambda c: setattr(c.sparsity, "schedule", ml_collections.ConfigDict(
        {"name": "polynomial", "final_sparsity": 0.9, "end": 8, "update_every": 2})),
     "reads a drop_fraction schedule"),
    (lambda c: c.sparsity.schedule.update(name="one_shot"), "unexpected keyword argument"),
    (lambda c: c.sparsity.update(rules=(("kernel", "nm:n=5,m=4"),)), "N=5, M=4"),
])
def test_bad_config_is_a_clear_error(tmp_path, mutate, message):
  config = tiny_config("rigl")
  mutate(config)
  with pytest.raises(trainer_lib.ConfigError, match=message):
    trainer_for(config, tmp_path)


def test_claims_runner_matches_the_trainer(tmp_path):
  """The claims script's scan + vmap over seeds computes what the trainer computes."""
  config = sparse_mlp.get_config("rigl")
  config.train.update(num_steps=6, eval_every=6, log_every=6)
  config.sparsity.schedule.update(end=4, update_every=2)
  t = trainer_for(config, tmp_path)
  summary = t.run()
  t.close()
  schedule = {"sparsity.schedule.end": 4, "sparsity.schedule.update_every": 2}
  rows = claims.train_seeds("rigl", 0.1, (1, 0), num_steps=6, overrides=schedule)
  assert [r["seed"] for r in rows] == [1, 0]
  assert rows[1]["test_accuracy"] == pytest.approx(summary["eval/accuracy"], abs=1e-6)
  assert rows[1]["density"] == pytest.approx(summary["density/global"], abs=1e-7)


def test_claims_summary_and_table():
  rows = [{"method": "dense", "sparsity": 0.0, "test_accuracy": a} for a in (0.9, 0.95, 1.0)]
  rows += [{"method": "rigl", "sparsity": 0.9, "test_accuracy": a} for a in (0.5, 0.7)]
  summary = claims.summarize(rows)
  assert summary == [  # sample std: sqrt(sum of squared deviations / (n - 1))
      {"method": "dense", "sparsity": 0.0, "mean": pytest.approx(0.95),
       "std": pytest.approx(0.05), "runs": 3},
      {"method": "rigl", "sparsity": 0.9, "mean": pytest.approx(0.6),
       "std": pytest.approx(0.02 ** 0.5), "runs": 2},
  ]
  lines = claims.table({"runs": rows, "sparsities": [0.9, 0.98]}).splitlines()
  assert lines[0] == "| method | 90% sparse | 98% sparse |"
  assert lines[2] == "| dense (0 % sparse) | 95.00 ± 5.00 | 95.00 ± 5.00 |"
  assert "| rigl | 60.00 ± 14.14 | - |" in lines


# ----------------------------------------------- gradient-scored initial masks and warm starts


def _numpy_kernel_grads(params, batch):
  """d(mean CE)/d(kernel) of the 2-hidden-layer ReLU MLP, backpropagated by hand in float64."""
  p = {n: {k: np.asarray(v, np.float64) for k, v in params[n].items()} for n in params}
  x, labels = batch["inputs"].astype(np.float64), batch["targets"]
  a1 = x @ p["layer_0"]["kernel"] + p["layer_0"]["bias"]
  h1 = np.maximum(a1, 0.0)
  a2 = h1 @ p["layer_1"]["kernel"] + p["layer_1"]["bias"]
  h2 = np.maximum(a2, 0.0)
  logits = h2 @ p["head"]["kernel"] + p["head"]["bias"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  d_logits = (probs - np.eye(10)[labels]) / len(labels)
  d_a2 = (d_logits @ p["head"]["kernel"].T) * (a2 > 0)
  d_a1 = (d_a2 @ p["layer_1"]["kernel"].T) * (a1 > 0)
  return {"head/kernel": h2.T @ d_logits, "layer_1/kernel": h1.T @ d_a2,
          "layer_0/kernel": x.T @ d_a1}


def _assert_top_k(keep, scores, k, rel=0.0):
  """`keep` holds exactly k entries, and no dropped score beats a kept one (up to `rel`, for
  float32-vs-float64 near-ties at the threshold)."""
  keep, scores = np.asarray(keep).reshape(-1), np.asarray(scores).reshape(-1)
  assert keep.sum() == k
  threshold = np.sort(scores)[::-1][k - 1]
  assert threshold > 0
  assert scores[keep].min() >= threshold * (1 - rel)
  assert scores[~keep].max() <= threshold * (1 + rel)


KERNELS = ("head/kernel", "layer_0/kernel", "layer_1/kernel")


@pytest.mark.parametrize("init, distribution", [("saliency", "global"), ("fisher", "erk")])
def test_gradient_scored_initial_mask_is_top_k_of_numpy_scores(tmp_path, init, distribution):
  config = tiny_config("static")
  config.sparsity.update(init=init, distribution=distribution, init_batches=3)
  t = trainer_for(config, tmp_path)
  mask = t.initial_mask.flat()
  params = t._init_params  # the seed's fresh init
  batches = t._train_iterator(np.arange(16))
  t.close()
  grads = [_numpy_kernel_grads(params, next(batches)) for _ in range(3)]  # the first 3 batches
  weights = {p: np.asarray(params[p.split("/")[0]]["kernel"], np.float64) for p in KERNELS}
  if init == "saliency":  # |w (mean_b g_b)|
    scores = {p: np.abs(weights[p] * np.mean([g[p] for g in grads], axis=0)) for p in KERNELS}
  else:  # sum_b g_b^2
    scores = {p: np.sum([g[p] ** 2 for g in grads], axis=0) for p in KERNELS}
  target = round(0.2 * (64 * 32 + 32 * 16 + 16 * 10))
  assert sum(int(mask[p].sum()) for p in KERNELS) == target  # realised density exact
  if distribution == "global":  # one top-k over all kernels together
    _assert_top_k(np.concatenate([np.asarray(mask[p]).ravel() for p in KERNELS]),
                  np.concatenate([scores[p].ravel() for p in KERNELS]), target, rel=1e-4)
  else:  # per kernel, the top count_l of its own scores
    for p in KERNELS:
      _assert_top_k(mask[p], scores[p], int(mask[p].sum()), rel=1e-4)
  for p in ("head/bias", "layer_0/bias", "layer_1/bias"):
    assert np.all(mask[p])


def test_warm_start_magnitude_mask_is_built_on_the_loaded_params(tmp_path):
  source_config = tiny_config("dense")
  source_config.seed = 7  # params unlike the warm run's own seed-0 init
  t = trainer_for(source_config, tmp_path / "source")
  source_state = t.init_state()
  loaded = jax.device_get(source_state["params"])
  t.save(source_state, 1)
  t.close()

  config = tiny_config("static")
  config.sparsity.update(init="magnitude", distribution="global")
  config.init.from_workdir = str(tmp_path / "source")
  t = trainer_for(config, tmp_path / "warm")
  state = t.restore_or_init()
  mask = t.initial_mask.flat()
  state = jax.device_get(state)
  t.close()
  target = round(0.2 * (64 * 32 + 32 * 16 + 16 * 10))
  _assert_top_k(np.concatenate([np.asarray(mask[p]).ravel() for p in KERNELS]),
                np.concatenate([np.abs(loaded[p.split("/")[0]]["kernel"]).ravel()
                                for p in KERNELS]), target)
  for p in KERNELS:  # the warm state holds the loaded weights where kept, exact zeros elsewhere
    layer = p.split("/")[0]
    np.testing.assert_array_equal(state["params"][layer]["kernel"],
                                  np.where(mask[p], loaded[layer]["kernel"], 0.0))
    np.testing.assert_array_equal(state["params"][layer]["bias"], loaded[layer]["bias"])
