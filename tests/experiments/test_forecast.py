"""The forecast task: synthetic series, patching, the patch forecaster's causality and
projections, the eval sums, and a few trainer steps."""
import pathlib
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import metrics as metrics_lib
from experiments import run_config
from experiments import tasks
from experiments import trainer as trainer_lib
from experiments.configs import base
from experiments.data import synthetic_series
from experiments.tasks import forecast
from sparsejax.models import forecaster

CONFIGS = pathlib.Path(trainer_lib.__file__).parent / "configs"


def test_synthesize_matches_a_hand_worked_window():
  # level 1, slope 2 over L=4 steps, a shift of 3 from t=2, 2 sin(2 pi t / 4), no noise:
  # 1 + [0, .5, 1, 1.5] + [0, 0, 3, 3] + [0, 2, 0, -2].
  series = synthetic_series.synthesize(
      4, level_N=np.array([1.0]), slope_N=np.array([2.0]), shift_N=np.array([3.0]),
      shift_at_N=np.array([2]), amplitude_NJ=np.array([[2.0, 0.0]]),
      phase_NJ=np.array([[0.0, 1.0]]), period_NJ=np.array([[4.0, 3.0]]),
      noise_NL=np.zeros((1, 4)))
  np.testing.assert_allclose(series, [[1.0, 3.5, 5.0, 3.5]], atol=1e-6)
  assert series.dtype == np.float32


def test_splits_are_seeded_balanced_and_random_access():
  a = synthetic_series.load_series("train", 12, 40)
  np.testing.assert_array_equal(a.series, synthetic_series.load_series("train", 12, 40).series)
  assert not np.allclose(a.series, synthetic_series.load_series("validation", 12, 40).series)
  assert not np.allclose(a.series, synthetic_series.load_series("train", 12, 40, seed=1).series)
  assert a.series.shape == (12, 40) and a.series.dtype == np.float32
  np.testing.assert_array_equal(a.frequency, [0, 1, 2, 3] * 3)
  example = a[5]
  assert (example["series"].shape, example["frequency"].dtype, int(example["frequency"])) == (
      (40,), np.int32, 1)
  assert a.summary() == ("synthetic_series[train]: 12 windows of 40 steps "
                         "(15min/hourly/daily/monthly)")
  batches = synthetic_series.eval_batches(a, 4)
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[1]["series"], a.series[4:8])


def test_a_noise_free_frequency_peaks_at_its_period():
  # 15-minute series over 4 days (384 steps): with noise, trend and shift left out, the largest
  # Fourier bin is the daily period of 96 steps (bin 4), the half-daily one bin 8.
  series = synthetic_series.synthesize(
      384, np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1, int), np.array([[1.0, 0.4]]),
      np.array([[0.3, 0.0]]), np.array([synthetic_series.FREQUENCIES[0].periods]),
      np.zeros((1, 384)))
  spectrum = np.abs(np.fft.rfft(series[0]))
  assert np.argmax(spectrum) == 4 and np.argsort(spectrum)[-2] == 8


def test_bad_data_arguments():
  with pytest.raises(ValueError, match="split='test' does not exist; allowed: train, validation"):
    synthetic_series.load_series("test", 4, 8)
  with pytest.raises(ValueError, match="batch_size=3 must be >= 1 and divide the 4 windows"):
    synthetic_series.eval_batches(synthetic_series.load_series("train", 4, 8), 3)


def test_patching_matches_a_naive_loop():
  series = np.arange(2 * 12, dtype=np.float32).reshape(2, 12) ** 1.5
  patches = np.asarray(forecaster.patch_series(jnp.asarray(series), 4))
  naive = np.array([[[series[b, t * 4 + p] for p in range(4)] for t in range(3)]
                    for b in range(2)])
  np.testing.assert_array_equal(patches, naive)
  inputs, targets = forecast.split_patches(jnp.asarray(series), 4)
  np.testing.assert_array_equal(inputs, naive[:, :2])
  np.testing.assert_array_equal(targets, naive[:, 1:])
  with pytest.raises(ValueError, match="patch_size=5 must be >= 1 and divide the series length"):
    forecaster.patch_series(jnp.asarray(series), 5)


def tiny_model(**overrides):
  fields = dict(patch_size=4, num_frequencies=3, d_model=8, num_layers=1, num_heads=2, d_ff=16,
                max_len=6)
  return forecaster.PatchForecaster(**{**fields, **overrides})


MOE = (("capacity_factor", None), ("expert", "ffn"), ("k", 2), ("num_experts", 4))


def test_moe_forecasts_are_causal():
  # Token-level dropless routing: a forecast at position t reads no patch after t.
  model = tiny_model(projection="shared", ffn="moe", ffn_kwargs=MOE)
  patches = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4))
  both = jnp.concatenate([patches, patches.at[:, 3:].add(5.0)])
  y_both, _ = jax.jit(lambda rng: model.init_with_output(rng, both)[0])(jax.random.PRNGKey(1))
  y, y_changed = y_both[:2], y_both[2:]
  np.testing.assert_allclose(y[:, :3], y_changed[:, :3], atol=1e-5)
  assert np.abs(np.asarray(y[:, 3:] - y_changed[:, 3:])).min() > 0


def test_a_token_mixer_gets_the_models_max_len():
  model = tiny_model(attention="token_mlp")
  patches = jnp.zeros((1, 6, 4))
  y, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), patches)[0])
  assert y.shape == (1, 6, 4)


def test_per_frequency_projection_is_the_series_frequencys():
  # Series b's forecast equals a shared-projection model's whose projections are frequency
  # f_b's slice of the per-frequency params.
  model, shared = tiny_model(projection="per_frequency"), tiny_model(projection="shared")
  patches = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))
  frequency = jnp.array([2, 0, 1])

  def run(rng):
    params = nn.meta.unbox(model.init(rng, patches, frequency)["params"])

    def shared_forecast(f, patches_TP):
      sliced = {k: (v[f][None] if k.startswith(("w_", "b_")) else v) for k, v in params.items()}
      return shared.apply({"params": sliced}, patches_TP[None])[0][0]

    return (model.apply({"params": params}, patches, frequency)[0],
            jax.vmap(shared_forecast)(frequency, patches))

  y, expected = jax.jit(run)(jax.random.PRNGKey(1))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_bad_model_settings():
  with pytest.raises(ValueError, match="projection='frequency'; allowed: shared, per_frequency"):
    tiny_model(projection="frequency")
  with pytest.raises(ValueError, match="unknown ffn kwarg 'experts'"):
    tiny_model(ffn="moe", ffn_kwargs=(("experts", 4),))
  config = base.get_config().model
  config.shared_router = True
  with pytest.raises(ValueError, match="model.shared_router=True is not supported"):
    forecaster.build_forecaster(config, patch_size=4, num_frequencies=2, projection="shared")


def tiny_config(**forecast_settings):
  c = base.get_config()
  c.task, c.data.name, c.mesh.data = "forecast", "synthetic_series", 1
  c.forecast.update(patch_size=4, train_series=64, projection="per_frequency",
                    **forecast_settings)
  c.model.update(d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
  c.train.update(num_steps=30, batch_size=16, seq_len=8, learning_rate=1e-2, warmup_steps=2,
                 log_every=10, eval_every=30, eval_batches=1)
  c.checkpoint.every = 30
  return c


def test_eval_sums_match_numpy():
  task = tasks.build_task(tiny_config())
  batch = task.eval_batches[0]

  def run(rng):
    variables = task.model.init(rng, task.init_inputs())
    return task.eval_step(variables, batch), task.apply(variables, batch)[0]

  sums, forecast_BTP = jax.jit(run)(jax.random.PRNGKey(0))
  summary = task.eval_summary(sums)
  series, frequency = batch["series"], batch["frequency"]
  windows = series.reshape(16, 9, 4)
  error = np.asarray(forecast_BTP) - windows[:, 1:]
  np.testing.assert_allclose(summary["eval/mse"], np.mean(error**2), rtol=1e-5)
  np.testing.assert_allclose(summary["eval/mae"], np.mean(np.abs(error)), rtol=1e-5)
  for f, name in enumerate(("15min", "hourly", "daily", "monthly")):
    np.testing.assert_allclose(summary[f"eval/mse/{name}"],
                               np.mean(error[frequency == f] ** 2), rtol=1e-5)
  persistence = windows[:, :8, -1:] - windows[:, 1:]
  np.testing.assert_allclose(summary["eval/naive_mse"], np.mean(persistence**2), rtol=1e-5)


def test_a_few_trainer_steps_reduce_the_loss(tmp_path):
  t = trainer_lib.Trainer(tiny_config(), str(tmp_path), jax.devices()[:1])
  try:
    summary = t.run()
  finally:
    t.close()
  losses = [r["train/loss"] for r in metrics_lib.read_metrics(str(tmp_path))]
  assert losses[-1] < 0.6 * losses[0]
  assert summary["eval/mse"] < summary["eval/naive_mse"]


@pytest.mark.parametrize("name", ["forecast_dense", "forecast_moe"])
def test_configs_build_their_forecaster(name):
  config = runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"]()
  run_config.check_config(config, tasks.TASKS)
  model = forecaster.build_forecaster(
      config.model, patch_size=config.forecast.patch_size,
      num_frequencies=len(synthetic_series.FREQUENCIES), projection=config.forecast.projection)
  patches = jnp.zeros((1, config.train.seq_len, config.forecast.patch_size))
  (y, _), _ = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), patches)
  assert y.shape == patches.shape
  assert model.ffn == ("moe" if name == "forecast_moe" else "dense")


def test_task_rejects_other_data():
  config = tiny_config()
  config.data.name = "python_stdlib"
  with pytest.raises(ValueError, match="config.data.name='python_stdlib'; the forecast task"):
    tasks.build_task(config)
