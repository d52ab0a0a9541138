"""Sparse memory finetuning: update only the memory slots that new data reads unusually often.

Finetuning a memory-layer model on new data, most forgetting comes from updating parameters that
every input uses. Sparse memory finetuning counts how often the new data reads each slot of each
value table (c_n), compares it with how many background documents (pretraining batches) read
that slot (df_n, out of D), ranks slots by TF-IDF

    tf_n = c_n / sum_m c_m,   idf_n = log((1 + D) / (1 + df_n)),   score_n = tf_n idf_n,

and trains only the value rows of the top-t slots: every other row, and every other parameter
unless asked, stays bit-identical (gradients are zeroed before the inner optimizer and its
updates are zeroed after it, so neither weight decay nor Adam moments can move a frozen row).

Pure pieces: `slot_counts`, `document_frequency`, `tfidf_scores`, `top_slots`, `row_mask`,
`sparse_update` (an optax transformation); `access_counts` runs a model once to count the reads
of each value table from what its memory layers sow (`layers.ACCESS`).

Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"; Berges et al. 2024, "Memory
Layers at Scale".
"""
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.memory import pkm
from sparsejax.memory.layers import ACCESS, SHARED_VALUES, VALUES


def slot_counts(idx_BHK: jax.Array, memory_size: int) -> jax.Array:
  """c_N float32: how many (token, head, k) reads each of the N slots got."""
  idx = jnp.asarray(idx_BHK).reshape(-1)
  return jnp.zeros((memory_size,), jnp.float32).at[idx].add(1.0)


def document_frequency(counts_DN: jax.Array) -> jax.Array:
  """df_N float32: in how many of the D background documents (rows) each slot was read."""
  return jnp.sum(jnp.asarray(counts_DN) > 0, axis=0).astype(jnp.float32)


def tfidf_scores(new_counts_N: jax.Array, background_counts_DN: jax.Array) -> jax.Array:
  """score_n = c_n / sum_m c_m * log((1 + D) / (1 + df_n)), float32 [N].

  `new_counts_N`: reads of each slot on the new data; `background_counts_DN`: reads on each of D
  background documents (e.g. pretraining batches), only their document frequency df is used.
  A slot the new data never reads scores 0; a slot every background document reads scores
  tf * log((1 + D) / (1 + D)) = 0. Lin et al. 2025 rank slots by TF-IDF of this kind; the
  +1 smoothing of D and df here is this library's choice.
  """
  new_counts_N = jnp.asarray(new_counts_N, jnp.float32)
  background_counts_DN = jnp.asarray(background_counts_DN)
  if background_counts_DN.ndim != 2 or background_counts_DN.shape[1] != new_counts_N.shape[-1]:
    raise ValueError(
        f"background_counts must have shape (D, N={new_counts_N.shape[-1]}), got "
        f"{background_counts_DN.shape}"
    )
  num_docs = background_counts_DN.shape[0]
  tf_N = new_counts_N / jnp.maximum(jnp.sum(new_counts_N), 1.0)
  idf_N = jnp.log((1.0 + num_docs) / (1.0 + document_frequency(background_counts_DN)))
  return tf_N * idf_N


def top_slots(scores_N: jax.Array, t: int) -> jax.Array:
  """The t slots of highest score, descending (int32 [t]); ties go to the lower index."""
  size = scores_N.shape[-1]
  if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= size:
    raise ValueError(f"t must be an int in [1, N={size}], got {t!r}")
  return jax.lax.top_k(jnp.asarray(scores_N), t)[1].astype(jnp.int32)


def row_mask(memory_size: int, slots: jax.Array) -> jax.Array:
  """bool [N], True at `slots`."""
  return jnp.zeros((memory_size,), bool).at[jnp.asarray(slots)].set(True)


def path_name(path: tuple[Any, ...]) -> str:
  """"a/b/c" for a pytree key path (dict keys, attribute names or indices)."""
  return "/".join(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def node_at(params: Mapping[str, Any], path: str) -> Any:
  """params["a"]["b"]... for path "a/b/..."."""
  node = params
  for name in path.split("/"):
    node = node[name]
  return node


def table_of(params: Mapping[str, Any], layer_path: str) -> str:
  """The value table a memory layer at `layer_path` (e.g. "layer_1/ffn") reads: its own
  "layer_1/ffn/values", or the model's shared "shared_memory_values"."""
  if VALUES in node_at(params, layer_path):
    return f"{layer_path}/{VALUES}"
  if SHARED_VALUES in params:
    return SHARED_VALUES
  raise ValueError(f"no value table found for the memory layer at {layer_path!r}")


def layer_reads(access: Mapping[str, Any]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{layer path: (idx, weights)} from a sown `ACCESS` collection (several calls concatenated)."""
  flat = jax.tree_util.tree_flatten_with_path(access, is_leaf=lambda x: isinstance(x, tuple))[0]
  by_layer: dict[str, dict[str, jax.Array]] = {}
  for path, calls in flat:
    *layer, kind = path_name(path).split("/")
    rows = [jnp.reshape(c, (-1,) + c.shape[-2:]) for c in calls]
    by_layer.setdefault("/".join(layer), {})[kind] = jnp.concatenate(rows)
  return {layer: (reads["idx"], reads["weights"]) for layer, reads in sorted(by_layer.items())}


def read_histograms(
    params: Mapping[str, Any], access: Mapping[str, Any]
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{layer path: (c_N, m_N)} of `pkm.slot_histograms` for every memory layer in `access`."""
  out = {}
  for layer, (idx, weights) in layer_reads(access).items():
    table = node_at(params, table_of(params, layer))
    out[layer] = pkm.slot_histograms(idx, weights, nn.meta.unbox(table).shape[0])
  return out


def window_metrics(
    histograms: Mapping[str, tuple[jax.Array, jax.Array]], prefix: str = "", top: int = 8
) -> dict[str, jax.Array]:
  """`pkm.histogram_stats` (usage, entropy, top share, top slots) of each layer's summed
  histograms, keyed f"{prefix}{layer}/{name}", e.g. "eval/layer_1/ffn/memory_usage"."""
  out = {}
  for layer, (counts_N, mass_N) in histograms.items():
    for name, value in pkm.histogram_stats(counts_N, mass_N, top=top).items():
      out[f"{prefix}{layer}/{name}"] = value
  return out


def access_counts(
    model: nn.Module, variables: Mapping[str, Any], tokens_BT: jax.Array
) -> dict[str, jax.Array]:
  """{value table path: c_N} — reads of each slot by one forward pass over `tokens_BT`.

  Layers that share a table (`shared_memory_values`) add into the same counts. Paths are as in
  `table_of`, e.g. "layer_1/ffn/values". Jit-safe (the model is static).
  """
  _, state = model.apply(dict(variables), tokens_BT, mutable=[ACCESS])
  counts: dict[str, jax.Array] = {}
  for layer, (counts_N, _) in read_histograms(variables["params"], state.get(ACCESS, {})).items():
    table = table_of(variables["params"], layer)
    counts[table] = counts[table] + counts_N if table in counts else counts_N
  return counts


def masks_for(
    params: Any, slots_by_table: Mapping[str, jax.Array], train_other: bool = False
) -> Any:
  """A tree like `params`: a bool [N] row mask (True at the chosen slots) for each table in
  `slots_by_table` (keyed by path, e.g. "layer_1/ffn/values"), and the Python bool `train_other`
  for every other leaf. Unknown table paths are a ValueError."""
  found = set()

  def leaf_mask(path, leaf):
    name = path_name(path)
    if name in slots_by_table:
      found.add(name)
      return row_mask(leaf.shape[0], slots_by_table[name])
    return train_other

  masks = jax.tree_util.tree_map_with_path(leaf_mask, params)
  missing = sorted(set(slots_by_table) - found)
  if missing:
    raise ValueError(f"slots_by_table names {missing}, which are not params")
  return masks


class SparseUpdateState(NamedTuple):
  inner: Any


def _frozen(mask: Any) -> bool:
  return isinstance(mask, (bool, np.bool_)) and not mask


def _no_change(value: jax.Array) -> jax.Array:
  """-0.0 everywhere: p + (-0.0) == p bit for bit, also for p = -0.0 (+0.0 would flip its sign)."""
  return jnp.full_like(value, -0.0)


def _where_rows(mask: Any, value: jax.Array) -> jax.Array:
  """`value` where `mask` (a bool, or a row mask over its leading axes) holds, else -0.0."""
  if isinstance(mask, (bool, np.bool_)):
    return value if mask else _no_change(value)
  mask = jnp.reshape(mask, mask.shape + (1,) * (value.ndim - mask.ndim))
  return jnp.where(mask, value, _no_change(value))


def sparse_update(
    inner: optax.GradientTransformation, masks: Any
) -> optax.GradientTransformation:
  """`inner` applied only where `masks` allows; every other entry gets an update of -0.0.

  `masks` is a tree like the params (e.g. from `masks_for`) whose leaves are Python bools (train
  or freeze the whole leaf) or bool arrays over a leaf's leading axes (a row mask [N] for an
  N x D value table). Gradients are zeroed outside the mask before `inner` (so a gradient clip
  inside `inner` sees only the trained entries), `inner` keeps no state for frozen leaves, and
  its updates are zeroed outside the mask afterwards, so weight decay and stale Adam moments
  cannot move a frozen row: `optax.apply_updates` leaves it bit-identical.
  Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning".
  """

  def trained(tree):
    return jax.tree.map(lambda x, m: None if _frozen(m) else x, tree, masks)

  def init_fn(params):
    return SparseUpdateState(inner.init(trained(params)))

  def update_fn(updates, state, params=None):
    grads = jax.tree.map(_where_rows, masks, updates)
    inner_updates, inner_state = inner.update(
        trained(grads), state.inner, None if params is None else trained(params)
    )
    inner_leaves = iter(jax.tree.leaves(inner_updates))
    out = jax.tree.map(
        lambda m, g: _no_change(g) if _frozen(m) else _where_rows(m, next(inner_leaves)),
        masks, updates,
    )
    return out, SparseUpdateState(inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
