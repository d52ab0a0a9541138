"""Argument checks shared by the analysis functions: one-line ValueErrors naming the argument."""
from typing import Any

import numpy as np


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
  """ValueError unless `value` is a Python int in [low, high] (no upper bound when high is None)."""
  bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < low or (high is not None and value > high)):
    raise ValueError(f"{name} must be an int {bounds}, got {value!r}")


def check_ndim(name: str, x: Any, ndim: int, letters: str) -> None:
  """ValueError unless `x` has `ndim` axes; `letters` spells the expected shape, e.g. "(N, D)"."""
  if np.ndim(x) != ndim:
    raise ValueError(f"{name} must have shape {letters}, got shape {np.shape(x)}")


def check_same(name: str, got: Any, want: Any, what: str) -> None:
  """ValueError unless got == want; `what` says what must agree, e.g. "the model dim D"."""
  if got != want:
    raise ValueError(f"{name} must match {what} ({want}), got {got}")
