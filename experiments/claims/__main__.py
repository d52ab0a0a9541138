"""`python -m experiments.claims NAME [NAME ...] [--seeds N] [--fast] [--out DIR]`, or `--all`.

Runs each claim, prints its table and verdict, and writes DIR/NAME.{json,md,png} (see
`experiments/claims/__init__.py`). `--fast` runs each claim at smoke-test size, one seed unless
`--seeds` says otherwise, into
experiments/claims/results/fast/ (all of them in under 15 minutes on a 2-core CPU).
"""
import argparse
import datetime
import sys
import time
import traceback

from experiments import claims


def run_claim(name: str, num_seeds: int | None, fast: bool, out_dir: str) -> dict:
  """Runs claim NAME, writes its files to `out_dir` and returns its record."""
  claim = claims.load(name)
  if num_seeds is None:
    num_seeds = 1 if fast else claim.default_seeds
  seeds = list(range(num_seeds))
  start = time.perf_counter()
  payload = claim.run(seeds, fast)
  wall_s = round(time.perf_counter() - start, 1)
  record = claims.envelope(claim, payload, seeds, fast, wall_s,
                           datetime.date.today().isoformat())
  claims.write(out_dir, claim, record)
  return record


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.claims", description=__doc__)
  parser.add_argument("names", nargs="*", help="claims to run (see --list)")
  parser.add_argument("--all", action="store_true", help="run every claim")
  parser.add_argument("--list", action="store_true", help="print the claims and stop")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds 0..N-1 (default: the claim's own; 1 with --fast)")
  parser.add_argument("--fast", action="store_true", help="smoke-test sizes; numbers mean nothing")
  parser.add_argument("--out", default=None, help="results folder (default: results/ or "
                      "results/fast/ with --fast)")
  args = parser.parse_args(argv)
  if args.list:
    for name in claims.NAMES:
      claim = claims.load(name)
      print(f"{name:20s} {claim.default_seeds} seeds, ~{claim.minutes:g} min  {claim.title}")
    return 0
  names = list(claims.NAMES) if args.all else args.names
  if not names:
    parser.error("name a claim (--list shows them) or pass --all")
  unknown = [n for n in names if n not in claims.NAMES]
  if unknown:
    parser.error(f"unknown claim(s) {', '.join(unknown)}; known: {', '.join(claims.NAMES)}")
  if args.seeds is not None and args.seeds < 1:
    parser.error(f"--seeds={args.seeds} must be >= 1")
  out_dir = args.out or (claims.FAST_RESULTS_DIR if args.fast else claims.RESULTS_DIR)
  total = time.perf_counter()
  failed = []
  for name in names:
    try:
      record = run_claim(name, args.seeds, args.fast, out_dir)
    except Exception:  # pylint: disable=broad-except  # report it, run the other claims
      traceback.print_exc()
      failed.append(name)
      continue
    print(f"\n## {name} ({record['wall_s']:.0f} s, seeds {record['seeds']})")
    print(claims.load(name).table(record["payload"]))
    print(f"reproduced: {record['reproduced']}. {record['verdict']}", flush=True)
  print(f"\n{len(names) - len(failed)} of {len(names)} claim(s) in "
        f"{time.perf_counter() - total:.0f} s; files in {out_dir}")
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
