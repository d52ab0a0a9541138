"""A seeded synthetic multi-frequency time-series dataset, generated in code (no download).

Each example is one univariate series window of L steps sampled at one of `FREQUENCIES`
(example i has frequency i mod F, so every split is balanced). A window is

  x_t = level + slope t / L + shift [t >= t_shift] + sum_j a_j sin(2 pi t / p_j + phi_j)
        + sigma_f eps_t,                                     t = 0 .. L-1,

with the two seasonal periods p_j of its frequency (in steps: 15-minute data has a daily
period of 96 steps, hourly data 24 and 168, ...) and, per window,
  level ~ N(0, 0.5^2), slope ~ N(0, 1) (the trend's rise over the window),
  a_1 ~ U(0.5, 1.5), a_2 = U(0.5, 1.5) with probability 1/2 else 0, phi_j ~ U(0, 2 pi),
  shift = N(0, 1) with probability 1/2 else 0 (a level shift: a regime change inside the
    window), t_shift ~ U{0 .. L-1},
  eps_t ~ N(0, 1) i.i.d. and sigma_f the frequency's noise scale.
So a frequency does not fix the pattern (second season on or off, trend, shift), and different
frequencies share shapes: the setting Moirai-MoE argues frequency-specific projections handle
poorly (Liu et al. 2024, "Moirai-MoE: Empowering Time Series Foundation Models with Sparse
Mixture of Experts").

A split is drawn from `np.random.default_rng([seed, SPLITS.index(split)])`, so it is identical
on every machine and the splits are independent draws. `SeriesDataset` is a random-access
source for `experiments.data.loader`: `ds[i]` is {"series": float32 [L], "frequency": int32 []}.
"""
import dataclasses

import numpy as np

NAME = "synthetic_series"
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Frequency:
  """A sampling frequency: its name, two seasonal periods (in steps) and noise scale sigma."""

  name: str
  periods: tuple[float, float]
  noise: float


FREQUENCIES = (
    Frequency("15min", (96.0, 48.0), 0.1),  # daily, half-daily
    Frequency("hourly", (24.0, 168.0), 0.2),  # daily, weekly
    Frequency("daily", (7.0, 30.44), 0.3),  # weekly, monthly
    Frequency("monthly", (12.0, 6.0), 0.2),  # yearly, half-yearly
)


def synthesize(length: int, level_N: np.ndarray, slope_N: np.ndarray, shift_N: np.ndarray,
               shift_at_N: np.ndarray, amplitude_NJ: np.ndarray, phase_NJ: np.ndarray,
               period_NJ: np.ndarray, noise_NL: np.ndarray) -> np.ndarray:
  """float32 [N, L] windows x_t = level + slope t / L + shift [t >= t_shift]
  + sum_j a_j sin(2 pi t / p_j + phi_j) + noise_t (see the module docstring)."""
  t_L = np.arange(length, dtype=np.float64)
  season_NL = np.sum(amplitude_NJ[:, :, None] * np.sin(
      2 * np.pi * t_L / period_NJ[:, :, None] + phase_NJ[:, :, None]), axis=1)
  series_NL = (level_N[:, None] + slope_N[:, None] * t_L / length
               + shift_N[:, None] * (t_L >= shift_at_N[:, None]) + season_NL + noise_NL)
  return series_NL.astype(np.float32)


def sample_series(rng: np.random.Generator, frequency_N: np.ndarray, length: int) -> np.ndarray:
  """float32 [N, L] windows, window n at frequency `FREQUENCIES[frequency_N[n]]`, with the
  parameters drawn from `rng` as the module docstring lists."""
  num = len(frequency_N)
  specs = [FREQUENCIES[f] for f in frequency_N]
  period_NJ = np.array([spec.periods for spec in specs])
  sigma_N = np.array([spec.noise for spec in specs])
  level_N = rng.normal(0.0, 0.5, num)
  slope_N = rng.normal(0.0, 1.0, num)
  amplitude_NJ = rng.uniform(0.5, 1.5, (num, 2)) * np.stack(
      [np.ones(num), rng.random(num) < 0.5], axis=1)
  phase_NJ = rng.uniform(0.0, 2 * np.pi, (num, 2))
  shift_N = rng.normal(0.0, 1.0, num) * (rng.random(num) < 0.5)
  shift_at_N = rng.integers(0, length, num)
  noise_NL = sigma_N[:, None] * rng.normal(0.0, 1.0, (num, length))
  return synthesize(length, level_N, slope_N, shift_N, shift_at_N, amplitude_NJ, phase_NJ,
                    period_NJ, noise_NL)


@dataclasses.dataclass(frozen=True)
class SeriesDataset:
  """A split of series windows: series float32 [N, L], frequency int32 [N] (an index into
  `FREQUENCIES`). A random-access source: `ds[i]` is {"series": float32 [L], "frequency":
  int32 []}."""

  series: np.ndarray
  frequency: np.ndarray
  split: str = ""

  def __len__(self) -> int:
    return len(self.frequency)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"series": self.series[i], "frequency": np.asarray(self.frequency[i], np.int32)}

  def summary(self) -> str:
    """One line for a start-up banner: name[split], windows, length, frequencies."""
    names = "/".join(f.name for f in FREQUENCIES)
    return (f"{NAME}[{self.split}]: {len(self):,} windows of {self.series.shape[1]} steps "
            f"({names})")


def load_series(split: str, num_series: int, length: int, seed: int = 0) -> SeriesDataset:
  """`num_series` windows of `length` steps of `split`, window i at frequency i mod F."""
  if split not in SPLITS:
    raise ValueError(f"{NAME} split={split!r} does not exist; allowed: {', '.join(SPLITS)}")
  if num_series < 1 or length < 1:
    raise ValueError(f"num_series={num_series} and length={length} must both be >= 1")
  frequency_N = np.arange(num_series, dtype=np.int32) % len(FREQUENCIES)
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  return SeriesDataset(sample_series(rng, frequency_N, length), frequency_N, split)


def eval_batches(dataset: SeriesDataset, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every window once, in order, as batches {"series": [B, L], "frequency": [B]}; the split's
  size must be a multiple of `batch_size`."""
  if batch_size < 1 or len(dataset) % batch_size:
    raise ValueError(f"batch_size={batch_size} must be >= 1 and divide the {len(dataset)} "
                     f"windows of {NAME}[{dataset.split}]")
  return [{"series": dataset.series[i:i + batch_size],
           "frequency": dataset.frequency[i:i + batch_size]}
          for i in range(0, len(dataset), batch_size)]
