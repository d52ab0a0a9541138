"""Train a model: `python -m experiments.train --config=experiments/configs/lm_dense.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g. `--config.train.num_steps=100`
or `--config.mesh.fsdp=2`. The run resumes from `DIR/checkpoints` if it holds a checkpoint.
Bad input (unknown config key, impossible mesh, unwritable workdir) and a NaN/inf loss stop the
run with a one-line `error:` message and exit status 1.

Multi-host (Cloud TPU pod slices, several GPU nodes): every host runs the same command;
`--distributed` (auto | true | false, default auto) calls `jax.distributed.initialize()` before
JAX starts, when true or when auto finds a multi-host environment (`wants_distributed`). The
mesh (`config.mesh`) then spans the devices of all hosts. See README "Cloud TPU / multi-host".
"""
import os
import runpy
import sys
from typing import Mapping

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(), e.g. experiments/configs/lm_dense.py."
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sparsejax", "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize() (multi-host): always, never, or when the environment "
    "shows several hosts (auto).")

# Environment variables whose value is a process count (multi-host when > 1).
_COUNT_VARS = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MEGASCALE_NUM_SLICES")
# Environment variables listing the hosts, comma-separated (multi-host when > 1 entry).
_HOST_LIST_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
# Environment variables that only exist in a multi-host launch.
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def wants_distributed(flag: str, environ: Mapping[str, str]) -> bool:
  """Whether to call `jax.distributed.initialize()`: `flag` "true" / "false", or for "auto"
  whether `environ` shows a multi-host launch: a coordinator address (JAX_COORDINATOR_ADDRESS,
  MEGASCALE_COORDINATOR_ADDRESS), a process count > 1 (JAX_NUM_PROCESSES, SLURM_NTASKS,
  SLURM_STEP_NUM_TASKS, OMPI_COMM_WORLD_SIZE, PMI_SIZE, MEGASCALE_NUM_SLICES) or more than one
  host in TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES."""
  if flag in ("true", "false"):
    return flag == "true"
  if flag != "auto":
    raise ValueError(f"--distributed must be auto, true or false, got {flag!r}")
  if any(environ.get(name) for name in _COORDINATOR_VARS):
    return True
  for name in _COUNT_VARS:
    try:
      if int(environ.get(name, "1")) > 1:
        return True
    except ValueError:
      pass
  return any(len([h for h in environ.get(name, "").split(",") if h.strip()]) > 1
             for name in _HOST_LIST_VARS)


def initialize_distributed(flag: str, environ: Mapping[str, str] = os.environ,
                           initialize=None) -> bool:
  """Calls `initialize` (default `jax.distributed.initialize`) if `wants_distributed`.

  JAX finds the coordinator, process count and index itself on Cloud TPU, SLURM and Open MPI;
  elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID on every host. Returns whether it initialised.
  """
  if not wants_distributed(flag, environ):
    return False
  if initialize is None:
    import jax  # pylint: disable=g-import-not-at-top  (only once the decision is made)
    initialize = jax.distributed.initialize
  kwargs = {}
  if environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
  if environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(environ["JAX_PROCESS_ID"])
  initialize(**kwargs)
  return True


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=v` whose key path is not in the config file, described."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, config_arg = spec.partition(":")  # "file.py:arg" calls get_config("arg")
  get_config = runpy.run_path(path)["get_config"]
  config = get_config(config_arg) if config_arg else get_config()
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
  except flags.Error as e:  # a config file that raised: its first line and the exception line
    lines = str(e).strip().splitlines()
    _fail(f"{lines[0]} {lines[-1]}" if "Traceback" in str(e) else str(e))
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
  try:
    initialize_distributed(_DISTRIBUTED.value)  # before anything starts JAX's backends
  except (RuntimeError, ValueError) as e:
    _fail(f"--distributed={_DISTRIBUTED.value}: jax.distributed.initialize() failed ({e})")
  from experiments import trainer  # pylint: disable=g-import-not-at-top  (jax after flag parsing)

  try:
    summary = trainer.train(config, _WORKDIR.value)
  except (trainer.ConfigError, trainer.NonFiniteLossError) as e:
    _fail(str(e))
  print(f"done at step {summary['step']}: " + ", ".join(
      f"{k}={v:.4g}" for k, v in summary.items() if k.startswith("eval/")), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
