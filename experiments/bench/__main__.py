"""`python -m experiments.bench NAME [--json FILE] [--repeats N] [--quick]`: print a table of cases."""
import argparse
import json
import sys

from experiments import bench


def format_table(rows: list[dict], baseline: str | None) -> str:
  """Rows as a fixed-width table, with each case's time as a ratio of the baseline case's."""
  base = next((r["median_s"] for r in rows if r["case"] == baseline), None)
  extra = sorted({k for r in rows for k in r} - {"case", "median_s", "peak_bytes"})
  header = ["case", "median_ms", "peak_MiB"] + (["speedup_vs_" + baseline] if base else []) + extra
  lines = [header]
  for r in rows:
    peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}"
    line = [r["case"], f"{r['median_s'] * 1e3:.2f}", peak]
    if base:
      line.append(f"{base / r['median_s']:.2f}x")
    line += [_fmt(r.get(k, "")) for k in extra]
    lines.append(line)
  widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def _fmt(value) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
  parser.add_argument("name", help=f"one of: {', '.join(bench.benchmark_names())}")
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
  parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats} must be >= 1")
  try:
    module = bench.load(args.name)
  except ValueError as e:
    parser.error(str(e))
  try:
    rows = module.run(repeats=args.repeats, quick=args.quick)
  except ValueError as e:  # e.g. a GPU benchmark asked for on a CPU-only machine
    parser.error(str(e))
  print(format_table(rows, getattr(module, "BASELINE", None)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
