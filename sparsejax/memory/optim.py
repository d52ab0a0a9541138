"""A separate learning rate for product-key memory value tables, via `optax.multi_transform`.

Memory values receive gradient only on the rows a batch reads, so each row is updated rarely;
the papers train them with a larger learning rate than the rest of the network.

Typical use (clip over all gradients first, then split):

  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      make_memory_optimizer(lambda lr: optax.adamw(lr, weight_decay=0.1), 3e-3, 3e-2),
  )

Lample et al. 2019, "Large Memory Layers with Product Keys"; Berges et al. 2024, "Memory Layers
at Scale".
"""
from typing import Any, Callable

import jax
import optax

from sparsejax.memory.layers import SHARED_VALUES, SUBKEYS, VALUES
from sparsejax.memory.sparse_optim import is_rows

VALUE_LABEL = "memory_values"
DEFAULT_LABEL = "default"


def _entry_name(entry: Any) -> Any:
  """The dict key, attribute name or sequence index of one pytree path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(f"unsupported pytree path entry {entry!r}")


def _is_value_table(params: Any, path: tuple[Any, ...]) -> bool:
  """Whether the leaf at `path` is a `values` param beside `subkeys` (a ProductKeyMemory's), or
  a model's `shared_memory_values` table."""
  names = [_entry_name(entry) for entry in path]
  if names and names[-1] == SHARED_VALUES:
    return True
  if not names or names[-1] != VALUES:
    return False
  parent = params
  for name in names[:-1]:
    parent = parent[name]
  return SUBKEYS in parent


def value_lr_labels(params: Any) -> Any:
  """A tree like `params` labelling each leaf "memory_values" or "default".

  A leaf is "memory_values" when it is named `values` in a module that also holds `subkeys`,
  i.e. the value table of a `ProductKeyMemory`, or `shared_memory_values` (a table shared by
  several layers, see `TransformerLM`). A `sparse_optim.Rows` (a table's gradient in row form)
  is one leaf. Raises ValueError when `params` has none, so a value learning rate is never
  silently ignored.
  """
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: VALUE_LABEL if _is_value_table(params, path) else DEFAULT_LABEL, params,
      is_leaf=is_rows,
  )
  if VALUE_LABEL not in jax.tree.leaves(labels):
    raise ValueError(
        "params hold no product-key memory value table (a 'values' param beside 'subkeys'); "
        "use the plain optimizer"
    )
  return labels


def make_memory_optimizer(
    make_tx: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    value_learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
  """`make_tx(value_learning_rate)` on memory value tables, `make_tx(learning_rate)` elsewhere.

  `make_tx` maps a learning rate (float or schedule) to an optax transformation, e.g.
  `lambda lr: optax.adamw(lr, b2=0.95)`; the two copies keep separate state. Leaves are split by
  `value_lr_labels`.
  """
  return optax.multi_transform(
      {DEFAULT_LABEL: make_tx(learning_rate), VALUE_LABEL: make_tx(value_learning_rate)},
      value_lr_labels,
  )
