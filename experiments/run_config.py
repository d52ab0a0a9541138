"""A run's config: the schema check, command-line overrides, and the copy kept in the workdir.

`check_config` rejects keys that `experiments/configs/base.py` does not define (outside the
free-form sections whose keys are a layer's own arguments). `apply_overrides` sets
`--config.a.b=v` values, also on fields whose default is None and on new layer arguments.
`check_resume` compares a run's config with the `config.json` its workdir was started with:
only the fields in `RESUMABLE` may differ.
"""
import ast
import json
import os
import runpy
import tempfile
from typing import Any, Iterable

import ml_collections

from experiments.configs import base as base_config

# Subtrees whose extra keys are a layer's own arguments, validated by the model builder.
FREE_FORM_KEYS = ("model.ffn", "model.attention", "model.embedding", "model.architecture",
                  "classifier", "sae.dictionary", "sparsity.updater", "sparsity.schedule")
# Fields a resumed run may change: length, logging, the optimizer's hyperparameters (not its
# structure), checkpointing, mesh, where data lives, and the warm start (fresh runs only).
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.plot_expert_load", "train.learning_rate", "train.warmup_steps",
             "train.end_lr_fraction", "train.weight_decay", "train.b1", "train.b2",
             "train.grad_clip", "train.sam_rho", "train.sam_rule", "checkpoint.*", "mesh.*",
             "init.*", "data.data_dir")
CONFIG_FILE = "config.json"


class ConfigError(ValueError):
  """A config, mesh or workdir value that cannot work; the message names it and what is allowed."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  """Dotted keys of `config`; free-form sections count as one key each."""
  keys = set()
  for name, value in config.items():
    key = prefix + name
    if isinstance(value, ml_collections.ConfigDict) and key not in FREE_FORM_KEYS:
      keys |= flat_keys(value, key + ".")
    else:
      keys.add(key)
  return keys


def check_config(config: ml_collections.ConfigDict, tasks: Iterable[str]) -> None:
  """Raises ConfigError for unknown keys (listing the allowed ones), an unknown task, or
  non-positive step, batch, logging or checkpoint settings."""
  allowed = flat_keys(base_config.get_config())
  for key in flat_keys(config):
    if key not in allowed:
      section = key.rsplit(".", 1)[0] if "." in key else ""
      siblings = sorted(k for k in allowed if k.rsplit(".", 1)[0] == section and "." in k) or (
          sorted(k for k in allowed if "." not in k))
      raise ConfigError(f"unknown config key {key!r}; allowed here: {', '.join(siblings)}")
  tasks = sorted(tasks)
  if config.task not in tasks:
    raise ConfigError(f"config.task={config.task!r}; allowed: {', '.join(tasks)}")
  for name in ("num_steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
    if config.train[name] < 1:
      raise ConfigError(f"config.train.{name}={config.train[name]} must be >= 1")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
    raise ConfigError(f"config.checkpoint.every={config.checkpoint.every} and config.checkpoint."
                      f"keep={config.checkpoint.keep} must both be >= 1")


def _parse_value(text: str, field_type: type | None) -> Any:
  """`text` as `field_type` (a field's declared type: bool, int, float or str; "None" clears a
  str field); for any other type, a None field or a new key, a Python literal if it reads as
  one (1.25, (0, 2), None), else the string."""
  if field_type is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a bool (true or false)")
    return text.lower() in ("true", "1")
  if field_type in (int, float):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    allowed = (int,) if field_type is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
      raise ValueError(f"{text!r} is not a{'n' if field_type is int else ''} "
                       f"{field_type.__name__}")
    return field_type(value)
  if field_type is str:
    return None if text == "None" else text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Sets each `--config.a.b=v` of `overrides` on `config` in place.

  A key must exist in `config`, except inside a free-form section (`model.ffn`, ...), where a
  new key adds a layer argument. Raises ConfigError naming the flag.
  """
  for arg in overrides:
    key, sep, text = arg[len("--config."):].partition("=")
    if not sep:
      raise ConfigError(f"flag {arg}: needs a value, e.g. {arg}=VALUE")
    *parents, leaf = key.split(".")
    node, path = config, ""
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(_unknown(key, arg, node, part))
      node, path = node[part], f"{path}{part}."
    free_form = path.rstrip(".") in FREE_FORM_KEYS
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not free_form):
      raise ConfigError(_unknown(key, arg, node, leaf))
    if isinstance(node.get(leaf), ml_collections.ConfigDict):
      raise ConfigError(f"flag {arg}: config.{key} is a section; set its fields, e.g. "
                        f"--config.{key}.{next(iter(node[leaf].keys()), 'name')}=...")
    try:
      value = _parse_value(text, node.get_type(leaf) if leaf in node else None)
      with node.ignore_type():
        node[leaf] = value
    except (ValueError, TypeError) as e:
      raise ConfigError(f"flag {arg}: {e}") from None


def _unknown(key: str, arg: str, node: Any, part: str) -> str:
  allowed = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
  return f"unknown config key {key!r} in {arg}; allowed at {part!r}: {allowed}"


def _flat_values(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix.rstrip("."): tree}
  out = {}
  for name, value in tree.items():
    out.update(_flat_values(value, f"{prefix}{name}."))
  return out


def _resumable(key: str) -> bool:
  return any(key == r or (r.endswith(".*") and key.startswith(r[:-1])) for r in RESUMABLE)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'key: saved -> current' for every leaf that differs outside `RESUMABLE`, sorted. A key
  the saved config lacks (a run from before the key existed) counts as its base default,
  except inside free-form sections, whose absent keys mean the layer's own defaults."""
  defaults = {k: v for k, v in _flat_values(json.loads(base_config.get_config().to_json())).items()
              if not any(k.startswith(free + ".") for free in FREE_FORM_KEYS)}
  old, new = _flat_values(saved), _flat_values(current)
  old = {k: old.get(k, defaults.get(k, "(absent)")) for k in set(old) | set(new)}
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not _resumable(k)]


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and checks a file can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir!r} is not a writable directory ({e.strerror})") from None


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError when `workdir/config.json` holds a config this run cannot resume."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changes = config_changes(saved, json.loads(config.to_json()))
  if changes:
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise ConfigError(
        f"--workdir={workdir} holds a run with another config ({path}): {shown}.\n"
        f"A resumed run may change only {', '.join(RESUMABLE)}; use a new --workdir for "
        f"another model, task or data.")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config to `workdir/config.json` (atomically)."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json(indent=1, sort_keys=True) + "\n")
  os.replace(path + ".tmp", path)


def load_config(spec: str, overrides: list[str]):
  """The config of `--config=FILE[:ARG]` with `overrides` applied; ConfigError when unusable."""
  path, _, arg = spec.partition(":")
  try:
    get_config = runpy.run_path(path)["get_config"]
    config = get_config(arg) if arg else get_config()
  except Exception as e:  # pylint: disable=broad-except  (a config file may raise anything)
    raise ConfigError(f"cannot load --config={spec} ({type(e).__name__}: {e})") from None
  apply_overrides(config, overrides)
  return config
