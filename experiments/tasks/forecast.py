"""The "forecast" task: next-patch forecasting of synthetic multi-frequency series.

Data: `experiments.data.synthetic_series` windows of (T + 1) P steps, T = train.seq_len patches
of P = forecast.patch_size steps. A window's patches p_0 .. p_T feed a decoder-only
`PatchForecaster` (`sparsejax.models.forecaster`, Transformer settings from config.model,
projections from forecast.projection): inputs p_0 .. p_{T-1}, targets p_1 .. p_T, so every
position t forecasts the next P steps from the patches up to t (the decoder-only objective of
Moirai-MoE, one update supervising every context length). Loss: mean squared error over all
target steps (Moirai-MoE fits a mixture distribution by likelihood; this task makes point
forecasts). Eval: MSE and MAE over every step of the eval windows, overall and per frequency
("eval/mse/hourly", ...), and "eval/naive_mse", the MSE of the persistence forecast (the last
seen value repeated for the next P steps).
"""
import numpy as np

import jax.numpy as jnp

from experiments.data import synthetic_series
from experiments.tasks.base import TASKS
from experiments.tasks.base import Task
from experiments.tasks.lm import LanguageModel
from sparsejax.models import forecaster


def split_patches(series_BL, patch_size: int):
  """(inputs_BTP, targets_BTP): the window's first T patches and its last T patches."""
  patches_BTP = forecaster.patch_series(series_BL, patch_size)
  return patches_BTP[:, :-1], patches_BTP[:, 1:]


@TASKS.register("forecast")
class Forecast(Task):
  """Next-patch forecasting with `forecaster.build_forecaster(config.model, ...)`."""

  headline = ("eval/mse", "eval/mae")
  unit = "tokens"
  batch_axes = ("batch",)

  # Routed experts count k / num_experts of their params per token, as in the LM.
  active_fraction = LanguageModel.active_fraction

  def __init__(self, config):
    super().__init__(config)
    train, forecast = config.train, config.forecast
    length = (train.seq_len + 1) * forecast.patch_size
    self.train_source = synthetic_series.load_series(
        config.data.train_split, forecast.train_series, length, seed=forecast.data_seed)
    eval_data = synthetic_series.load_series(
        config.data.eval_split, train.eval_batches * train.batch_size, length,
        seed=forecast.data_seed)
    self.eval_batches = synthetic_series.eval_batches(eval_data, train.batch_size)
    self.model = forecaster.build_forecaster(
        config.model, patch_size=forecast.patch_size,
        num_frequencies=len(synthetic_series.FREQUENCIES), projection=forecast.projection)
    self.units_per_example = train.seq_len
    self.description = (f"{self.train_source.summary()}; eval {eval_data.summary()}; "
                        f"{train.seq_len} patches of {forecast.patch_size}")

  @classmethod
  def check_config(cls, config):
    if config.data.name != synthetic_series.NAME:
      raise ValueError(f"config.data.name={config.data.name!r}; the forecast task reads "
                       f"{synthetic_series.NAME!r}")
    if config.train.seq_len > config.model.max_len:
      raise ValueError(f"config.train.seq_len={config.train.seq_len} exceeds "
                       f"config.model.max_len={config.model.max_len}")

  def init_inputs(self):
    return jnp.zeros((1, self.config.train.seq_len, self.config.forecast.patch_size))

  def apply(self, variables, batch, **kwargs):
    """The model on the batch's input patches, with each series' frequency."""
    inputs_BTP, _ = split_patches(batch["series"], self.config.forecast.patch_size)
    return self.model.apply(variables, inputs_BTP, batch["frequency"], **kwargs)

  def loss(self, outputs, batch):
    _, targets_BTP = split_patches(batch["series"], self.config.forecast.patch_size)
    return jnp.mean(jnp.square(outputs - targets_BTP)), {}

  def eval_step(self, variables, batch):
    """Per frequency [F]: (squared-error sum, absolute-error sum, persistence squared-error
    sum, step count)."""
    inputs_BTP, targets_BTP = split_patches(batch["series"], self.config.forecast.patch_size)
    forecast_BTP, _ = self.model.apply(variables, inputs_BTP, batch["frequency"],
                                       deterministic=True)
    naive_BTP = jnp.broadcast_to(inputs_BTP[:, :, -1:], inputs_BTP.shape)
    onehot_BF = (batch["frequency"][:, None]
                 == jnp.arange(len(synthetic_series.FREQUENCIES))).astype(jnp.float32)
    per_series = lambda e_BTP: jnp.sum(e_BTP, axis=(1, 2)) @ onehot_BF
    return (per_series(jnp.square(forecast_BTP - targets_BTP)),
            per_series(jnp.abs(forecast_BTP - targets_BTP)),
            per_series(jnp.square(naive_BTP - targets_BTP)),
            jnp.sum(onehot_BF, axis=0) * targets_BTP.shape[1] * targets_BTP.shape[2])

  def eval_summary(self, totals):
    squared_F, absolute_F, naive_F, count_F = (np.asarray(t, np.float64) for t in totals)
    count = max(count_F.sum(), 1.0)
    summary = {"eval/mse": squared_F.sum() / count, "eval/mae": absolute_F.sum() / count,
               "eval/naive_mse": naive_F.sum() / count}
    for f, frequency in enumerate(synthetic_series.FREQUENCIES):
      n = max(count_F[f], 1.0)
      summary[f"eval/mse/{frequency.name}"] = squared_F[f] / n
      summary[f"eval/mae/{frequency.name}"] = absolute_F[f] / n
    return {k: float(v) for k, v in summary.items()}
