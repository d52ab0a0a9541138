"""Train a model: `python -m experiments.train --config=experiments/configs/lm_dense.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g. `--config.train.num_steps=100`,
`--config.mesh.fsdp=2`, a field whose default is None (`--config.model.ffn.capacity_factor=1.25`)
or a new argument of the chosen layer (`--config.model.ffn.jitter=0.1`); a config file may take
an argument, `--config=experiments/configs/sparse_mlp.py:rigl`. The run resumes from
`DIR/checkpoints` if it holds a checkpoint (and `DIR/config.json` matches, see
`experiments.run_config`).

Exit status: 0 when the run reached `train.num_steps`; 1 with a one-line `error:` message for bad
input (unknown config key, impossible mesh, unwritable workdir, a workdir of another model) or a
NaN/inf loss; EXIT_PREEMPTED (75, EX_TEMPFAIL) when SIGTERM/SIGINT stopped it early after
saving a checkpoint: rerun the same command to resume.

Multi-host (Cloud TPU pod slices, several GPU nodes): every host runs the same command;
`--distributed` (auto | true | false, default auto) calls `jax.distributed.initialize()` before
JAX starts, when true or when auto finds a multi-host environment (`wants_distributed`). The
mesh (`config.mesh`) then spans the devices of all hosts. See README "Cloud TPU / multi-host".
"""
import os
import sys
from typing import Mapping

from absl import app
from absl import flags
from absl import logging

from experiments import run_config
from experiments.preemption import EXIT_PREEMPTED

_CONFIG = flags.DEFINE_string(
    "config", None, "Path to a config file with get_config(), e.g. experiments/configs/lm_dense.py "
    "(FILE:ARG calls get_config(ARG)); override fields with --config.a.b=VALUE.")
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
  """Prints the one-line error and exits 1 at once: library threads that are still winding down
  (e.g. the checkpoint reader of a step that failed to restore) must not print after it."""
  print(f"error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


_OVERRIDES: list[str] = []  # the --config.a.b=v arguments, applied after the file is loaded


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flags, with the `--config.*` overrides set aside for `run_config.apply_overrides`."""
  _OVERRIDES[:] = [a for a in argv[1:] if a.startswith("--config.")]
  try:
    return flags.FLAGS([a for a in argv if not a.startswith("--config.")])
  except flags.Error as e:
    _fail(str(e))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=experiments/configs/lm_dense.py")
  try:
    config = run_config.load_config(_CONFIG.value, _OVERRIDES)
  except run_config.ConfigError as e:
    _fail(str(e))
  if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (Orbax) off the console
    logging.set_verbosity(logging.WARNING)
  try:
    initialize_distributed(_DISTRIBUTED.value)  # before anything starts JAX's backends
  except (RuntimeError, ValueError) as e:
    _fail(f"--distributed={_DISTRIBUTED.value}: jax.distributed.initialize() failed ({e})")
  from experiments import trainer  # pylint: disable=g-import-not-at-top  (jax after flag parsing)

  try:
    summary = trainer.train(config, _WORKDIR.value)
  except (trainer.ConfigError, trainer.NonFiniteLossError, trainer.ckpt_lib.CheckpointError) as e:
    _fail(str(e))
  if summary["preempted"]:
    print(f"preempted at step {summary['step']} (checkpoint saved); rerun the same command to "
          f"resume; exit status {EXIT_PREEMPTED}", flush=True)
    sys.exit(EXIT_PREEMPTED)
  print(f"done at step {summary['step']}: " + ", ".join(
      f"{k}={summary[k]:.4g}" for k in summary["headline"] if k in summary), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
