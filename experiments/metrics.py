"""Metric sinks: `workdir/metrics.jsonl`, a stdout line per log step, TensorBoard if installed."""
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np


def to_jsonable(value: Any) -> Any:
  """Scalars become floats/ints, arrays become (nested) lists, non-finite floats stay as NaN/inf."""
  array = np.asarray(value)
  if array.ndim == 0:
    item = array.item()
    return float(item) if isinstance(item, float) else item
  return array.tolist()


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to the console and TensorBoard.

  The console shows per-layer telemetry averaged over layers (`train/*/ffn/router_entropy`);
  metrics.jsonl and TensorBoard keep every layer's value.
  """

  def __init__(self, workdir: str, resume_step: int = 0, primary: bool = True):
    """Records after `resume_step` (left by a run killed after its last checkpoint, which the
    resumed run replays) are dropped, so the file keeps exactly one record per logged step.
    Only the `primary` process of a multi-process run writes files; every one prints."""
    self.path = os.path.join(workdir, "metrics.jsonl") if primary else None
    self._tb = None
    if primary:
      _drop_records_after(self.path, resume_step)
      self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"), resume_step)

  def write(self, step: int, metrics: dict[str, Any], eta_seconds: float | None = None) -> None:
    record = {"step": step, **{k: to_jsonable(v) for k, v in sorted(metrics.items())}}
    if self.path is not None:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    print(_console_line(step, scalars, eta_seconds), flush=True)
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _record_step(line: str) -> int | None:
  """The step of one metrics.jsonl line; None for a line cut short by a kill."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def layer_order(key: str) -> tuple[int, str]:
  """Sort key putting `.../layer_<i>/...` keys in layer order."""
  match = re.search(r"layer_(\d+)/", key)
  return (int(match[1]) if match else -1, key)


def banner(mesh, task, param_counts: tuple[int, int], step: int, num_steps: int) -> str:
  """The start-up lines: devices and mesh, parameters, data, and where the run starts."""
  devices = mesh.devices.flatten()
  kinds = sorted({d.device_kind for d in devices})
  axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  total, active = param_counts
  per = "token" if task.unit == "tokens" else "example"
  start = f"resuming at step {step}" if step else "starting at step 0"
  return "\n".join([
      f"devices: {len(devices)} x {', '.join(kinds)} in {jax.process_count()} process(es); mesh {axes}",
      f"model: {total:,} parameters, {active:,} active per {per}",
      f"data: {task.description}",
      f"task: {task.config.task}, {num_steps} steps, {start}; compiling ...",
  ])


_LAYER_KEY = re.compile(r"^(\w+)/layer_\d+/(.+)$")


def average_over_layers(scalars: dict[str, float]) -> dict[str, float]:
  """Per-layer keys `p/layer_<i>/name` replaced by their mean over layers, keyed `p/*/name`."""
  out, per_name = {}, {}
  for key, value in scalars.items():
    match = _LAYER_KEY.match(key)
    if match:
      per_name.setdefault(f"{match[1]}/*/{match[2]}", []).append(value)
    else:
      out[key] = value
  return {**out, **{k: sum(v) / len(v) for k, v in per_name.items()}}


def _console_line(step: int, scalars: dict[str, float], eta_seconds: float | None) -> str:
  scalars = average_over_layers(scalars)
  first = ("train/loss", "eval/loss", "eval/bpb", "eval/accuracy", "steps_per_sec",
           "tokens_per_sec", "examples_per_sec")
  keys = [k for k in first if k in scalars] + sorted(k for k in scalars if k not in first)
  parts = [f"step {step}"] + [f"{k}={scalars[k]:.4g}" for k in keys]
  if eta_seconds is not None:
    parts.append(f"eta={format_eta(eta_seconds)}")
  return " | ".join(parts)


def _tensorboard_writer(logdir: str, resume_step: int):
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step else None)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
