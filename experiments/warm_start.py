"""Starting a run from another run's params (`config.init.from_workdir`), upcycled if asked.

Only a fresh run warm-starts: a run that has its own checkpoint resumes from it instead.
"""
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import checkpoints as ckpt_lib
from sparsejax.moe import upcycle


def open_source(init: ml_collections.ConfigDict) -> tuple[ckpt_lib.Checkpoints, int]:
  """The checkpoints of `init.from_workdir` and their latest step; ValueError if it has none."""
  source = ckpt_lib.Checkpoints(init.from_workdir, read_only=True)
  step = source.latest_step()
  if step is None:
    raise ValueError(f"config.init.from_workdir={init.from_workdir!r} holds no checkpoint")
  return source, step


def same_structure(loaded: Any, template: Any) -> Any:
  """`loaded` after checking it has the tree structure and leaf shapes of `template`."""
  if jax.tree.structure(loaded) != jax.tree.structure(template):
    raise ValueError("its params do not have this model's structure; set config.init.upcycle "
                     "to turn a dense model into an MoE one")
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(template)[0],
                               jax.tree.leaves(loaded)):
    if got.shape != want.shape:
      raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {got.shape}, this model "
                       f"needs {want.shape}")
  return jax.tree.map(lambda a, b: np.asarray(a, b.dtype), loaded, template)


def load_params(init: ml_collections.ConfigDict, template: Any) -> Any:
  """The params of `init.from_workdir` (upcycled if `init.upcycle`) shaped like `template`, as
  host arrays; ValueError naming the workdir when they do not fit this model."""
  source, step = open_source(init)
  loaded = source.restore_params(step)
  try:
    params = (upcycle.upcycle_params(loaded, template) if init.upcycle
              else same_structure(loaded, template))
  except ValueError as e:
    raise ValueError(f"config.init.from_workdir={init.from_workdir!r}: {e}") from None
  print(f"initialised from {source.directory} step {step}"
        f"{' (upcycled)' if init.upcycle else ''}", flush=True)
  return params
