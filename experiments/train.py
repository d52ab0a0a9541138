"""Train a model: `python -m experiments.train --config=experiments/configs/lm_dense.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g. `--config.train.num_steps=100`
or `--config.mesh.fsdp=2`. The run resumes from `DIR/checkpoints` if it holds a checkpoint.
Bad input (unknown config key, impossible mesh, unwritable workdir) and a NaN/inf loss stop the
run with a one-line `error:` message and exit status 1.
"""
import runpy
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(), e.g. experiments/configs/lm_dense.py."
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sparsejax", "Directory for checkpoints and metrics.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=v` whose key path is not in the config file, described."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    return None
  config = runpy.run_path(path)["get_config"]()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, key = config, arg[len("--config."):].split("=", 1)[0]
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        allowed = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
        return f"unknown config key {key!r} in {arg}; allowed at {part!r}: {allowed}"
      node = node[part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except  (a bad override raises KeyError & co.)
    try:
      described = _unknown_override(argv)
    except Exception:  # pylint: disable=broad-except
      described = None
    _fail(described or f"cannot apply the command-line config ({type(e).__name__}: {e})")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except  (unreadable config file)
    _fail(f"cannot load --config ({type(e).__name__}: {e})")
  if config is None:
    _fail("--config is required, e.g. --config=experiments/configs/lm_dense.py")
  if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (Orbax) off the console
    logging.set_verbosity(logging.WARNING)
  from experiments import trainer  # pylint: disable=g-import-not-at-top  (jax after flag parsing)

  try:
    summary = trainer.train(config, _WORKDIR.value)
  except (trainer.ConfigError, trainer.NonFiniteLossError) as e:
    _fail(str(e))
  print(f"done at step {summary['step']}: " + ", ".join(
      f"{k}={v:.4g}" for k, v in summary.items() if k.startswith("eval/")), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
