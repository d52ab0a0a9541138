"""Orbax checkpointing of the train state plus JSON metadata (step, data state, config).

Saves are atomic (Orbax writes to a temporary directory and renames); the state is restored
directly into the shardings of the current mesh, so a checkpoint written on one mesh restores
on another. `restore_latest` fails safe: a step that does not restore (a partial or corrupt
folder, a stray folder beside the good ones) is reported in one line and the next older step is
tried; once one restores, the unreadable newer ones are moved to `workdir/unreadable_checkpoints/`.
"""
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from experiments import run_config

UNREADABLE_DIR = "unreadable_checkpoints"


class CheckpointError(RuntimeError):
  """The workdir holds checkpoints and none of them restores."""


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _ignore_closed_loop_errors() -> None:
  """Drops the "Event loop is closed" errors that the other array reads of a failed restore
  raise when TensorStore completes them on Orbax's closed loop (before and after the restore
  raises, so after a failure it stays on); any other unraisable error reaches the previous
  hook."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_errors", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_errors = True
  sys.unraisablehook = hook


class Checkpoints:
  """The `workdir/checkpoints` manager: periodic saves, keeps the last `keep`, restores the latest."""

  def __init__(self, workdir: str, keep: int = 1, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only
        ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """State placed with the shardings of `abstract_state` (ShapeDtypeStructs), and the metadata."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.meta

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any], int] | None:
    """(state, metadata, step) of the newest step that restores; None when there is no step.

    Newer steps that did not restore are moved aside only once an older one has restored, so a
    model that fits none of the steps (or a passing read error) moves nothing. Raises
    CheckpointError when there are steps and none restores.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    previous_hook = sys.unraisablehook
    _ignore_closed_loop_errors()
    unreadable = []
    for step in steps:
      try:
        state, meta = self.restore(step, abstract_state)
        jax.block_until_ready(state)
      except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds on bad data)
        print(f"warning: checkpoint step {step} does not restore ({_first_line(e)}); trying an "
              f"older step", flush=True)
        unreadable.append(step)
        continue
      for bad in unreadable:
        print(f"moved the unreadable step {bad} to {self._set_aside(bad)}", flush=True)
      if not unreadable:
        sys.unraisablehook = previous_hook
      return state, meta, step
    if steps:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores (steps {', '.join(map(str, steps))}; "
          f"nothing was moved): check that the config matches the run, or move the directory "
          f"away to start afresh")
    sys.unraisablehook = previous_hook
    return None

  def _set_aside(self, step: int) -> str:
    """Moves step `step`'s folder out of the checkpoint directory; returns where it went."""
    target = os.path.join(self.workdir, UNREADABLE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def restore_saved(self, step: int) -> Any:
    """The state saved at `step`, as host arrays in its saved structure (no target needed)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    return restored.state

  def restore_params(self, step: int) -> Any:
    """The params saved at `step`, as host arrays in their saved structure."""
    return self.restore_saved(step)["params"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def restore_run(workdir: str, task: str) -> tuple[ml_collections.ConfigDict, int, Any]:
  """(config, step, saved state) of the latest checkpoint of the finished `task` run in `workdir`;
  ValueError when `workdir` holds another task's run or no checkpoint."""
  with open(os.path.join(workdir, run_config.CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.task != task:
    raise ValueError(f"{workdir} holds a {config.task!r} run; only {task!r} runs are read here")
  source = Checkpoints(workdir, read_only=True)
  try:
    step = source.latest_step()
    if step is None:
      raise ValueError(f"{workdir} holds no checkpoint")
    return config, step, source.restore_saved(step)
  finally:
    source.close()
