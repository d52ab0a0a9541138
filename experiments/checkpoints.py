"""Orbax checkpointing of the train state plus JSON metadata (step, data position, config).

Saves are atomic (Orbax writes to a temporary directory and renames); the state is restored
directly into the shardings of the current mesh, so a checkpoint written on one mesh restores
on another.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """The `workdir/checkpoints` manager: periodic saves, keeps the last `keep`, restores the latest."""

  def __init__(self, workdir: str, keep: int = 1, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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

  def restore_params(self, step: int) -> Any:
    """The params saved at `step`, as host arrays in their saved structure (no target needed)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    return restored.state["params"]

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
