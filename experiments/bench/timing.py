"""Timing and memory helpers shared by the benchmarks."""
import contextlib
import os
import statistics
import time
from typing import Any, Callable

import jax


def compiled_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled executable, if XLA says."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(
      stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
      - stats.alias_size_in_bytes
  )


def interleaved_calls(calls: dict[str, Callable[[], Any]], *, repeats: int,
                      warmup: int = 1) -> list[dict[str, Any]]:
  """One row per call `{name: fn}`, timed round-robin so load drift hits every call alike.

  Each round runs every call once, in order; a row holds the median wall seconds over `repeats`
  rounds after `warmup` rounds, with min_s and max_s as the spread, and the machine's 1-minute
  load average when the rounds ended (`load_avg`: what else was running).
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  times: dict[str, list[float]] = {name: [] for name in calls}
  for round_index in range(warmup + repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
  load_avg = round(os.getloadavg()[0], 1)
  return [{"case": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
           "load_avg": load_avg} for name, t in times.items()]


def interleaved_cases(cases: dict[str, tuple], *, repeats: int,
                      warmup: int = 1) -> list[dict[str, Any]]:
  """One row per case `{name: (fn, args)}` or `{name: (fn, args, mesh)}`, timed round-robin.

  Each case is compiled ahead of time (under `jax.set_mesh(mesh)` when a mesh is given, so cases
  on different meshes share the rounds), then `interleaved_calls` runs every executable once per
  round, blocking on its result. A row holds median_s, min_s, max_s over `repeats` rounds after
  `warmup` rounds, and XLA's peak bytes estimate.
  """
  compiled = {}
  for name, (fn, args, *mesh) in cases.items():
    with jax.set_mesh(mesh[0]) if mesh else contextlib.nullcontext():
      compiled[name] = jax.jit(fn).lower(*args).compile()
  rows = interleaved_calls(
      {name: _blocking_call(compiled[name], args) for name, (_, args, *_) in cases.items()},
      repeats=repeats, warmup=warmup)
  for row in rows:
    row["peak_bytes"] = compiled_peak_bytes(compiled[row["case"]])
  return rows


def _blocking_call(compiled: jax.stages.Compiled, args: tuple) -> Callable[[], Any]:
  return lambda: jax.block_until_ready(compiled(*args))
