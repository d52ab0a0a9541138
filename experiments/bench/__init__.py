"""Benchmarks: `python -m experiments.bench NAME [--json FILE]`.

A benchmark is a module `experiments/bench/NAME.py` defining `DESCRIPTION` (one line),
`BASELINE` (the case every other case is compared against) and
`run(repeats: int, quick: bool) -> list[dict]`. A row is
`{"case": str, "median_s": float, "min_s": float, "max_s": float, "peak_bytes": int | None, ...}`:
one measured case, the median (and spread) over `repeats` rounds after a warm-up, the cases timed
interleaved by `timing.interleaved_cases` (round-robin, so load drift hits every case alike). Ratios are printed against the baseline measured in the
same run, never against stored numbers. Adding the module is all it takes to register it.
"""
import importlib
import pkgutil

_NOT_BENCHMARKS = frozenset({"timing"})


def benchmark_names() -> list[str]:
  """Names of the modules in this package that define `run` (the benchmarks)."""
  names = []
  for info in pkgutil.iter_modules(__path__):
    if info.name.startswith("_") or info.name in _NOT_BENCHMARKS:
      continue
    names.append(info.name)
  return sorted(names)


def load(name: str):
  """The benchmark module `name`, with a clear error for an unknown one."""
  names = benchmark_names()
  if name not in names:
    raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(names) or '(none yet)'}")
  return importlib.import_module(f"{__name__}.{name}")
