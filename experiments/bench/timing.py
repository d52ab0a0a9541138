"""Timing and memory helpers shared by the benchmarks."""
import statistics
import time
from typing import Any, Callable

import jax


def time_jitted(fn: Callable[..., Any], *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall seconds of `fn(*args)` (already jitted), blocking on the result, after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def peak_bytes(fn: Callable[..., Any], *args) -> int | None:
  """XLA's compiled peak estimate for `jax.jit(fn)(*args)`: arguments + outputs + temporaries."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(
      stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
      - stats.alias_size_in_bytes
  )


def case(name: str, fn: Callable[..., Any], *args, repeats: int, **extra) -> dict[str, Any]:
  """One benchmark row for `fn(*args)`: median seconds, peak bytes and any extra fields."""
  jitted = jax.jit(fn)
  return {
      "case": name,
      "median_s": time_jitted(jitted, *args, repeats=repeats),
      "peak_bytes": peak_bytes(fn, *args),
      **extra,
  }


def interleaved_cases(cases: dict[str, tuple[Callable[..., Any], tuple]], *, repeats: int,
                      warmup: int = 1) -> list[dict[str, Any]]:
  """One row per case `{name: (fn, args)}`, timed round-robin so load drift hits every case alike.

  Each round runs every case once (jitted, blocking on the result); a row holds the median over
  `repeats` rounds after `warmup` rounds, with min_s and max_s as the spread, and XLA's peak
  bytes estimate.
  """
  jitted = {name: jax.jit(fn) for name, (fn, _) in cases.items()}
  times: dict[str, list[float]] = {name: [] for name in cases}
  for round_index in range(warmup + repeats):
    for name, (_, args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(jitted[name](*args))
      if round_index >= warmup:
        times[name].append(time.perf_counter() - start)
  return [{"case": name, "median_s": statistics.median(times[name]), "min_s": min(times[name]),
           "max_s": max(times[name]), "peak_bytes": peak_bytes(fn, *args)}
          for name, (fn, args) in cases.items()]
