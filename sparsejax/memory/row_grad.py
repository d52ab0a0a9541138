"""Loss gradients whose memory value tables come in row form: no N x D gradient is ever formed.

`jax.grad` of a loss w.r.t. an N x D value table is a zero N x D buffer with the rows read
scattered into it, so a train step with a dense gradient costs O(N D) however few rows it reads.
Here the table is not differentiated at all: each `ProductKeyMemory` reads it under
stop_gradient and adds a zero "rows" input to the gathered rows (the `layers.VALUE_ROWS`
collection), whose gradient is the gradient of every row read; with the read slots (sown in
`layers.ACCESS`) they give the table's gradient as `sparse_optim.Rows` (unique rows and their
summed gradient), in O(R D) for R rows read. `sparse_optim.row_adamw`, `clip_by_global_norm`,
`tree_norm` and `apply_updates` consume it.

Berges et al. 2024, "Memory Layers at Scale" (sparse updates of the memory values); Lample et al.
2019, "Large Memory Layers with Product Keys".
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsejax.memory import finetune
from sparsejax.memory import optim
from sparsejax.memory import sparse_optim
from sparsejax.memory.layers import ACCESS, VALUE_ROWS


def _layer_path(path) -> str:
  """"layer_0/ffn" for the path of "layer_0/ffn/rows"."""
  return finetune.path_name(path).rsplit("/", 1)[0]


def table_rows(params: Any, access: Any, rows_grads: Any) -> dict[str, sparse_optim.Rows]:
  """{table path: Rows} from each memory layer's reads (`ACCESS`) and row gradients.

  For a table V read by layers l with slots idx_l (T, H, K) and row gradients g_l (T, H K, D),
  grad V = sum over l, t, j of g_l[t, j] at row idx_l[t, j], as `Rows`: the unique rows
  ascending (padded with N) and their summed gradients (`sparse_optim.merge_rows`), i.e.
  exactly the non-zero rows of the dense gradient; O(R log R + R D).
  """
  reads = finetune.layer_reads(access)
  by_table: dict[str, list[tuple[jax.Array, jax.Array]]] = {}
  for path, grad_TRD in jax.tree_util.tree_flatten_with_path(rows_grads)[0]:
    layer = _layer_path(path)
    idx_THK = reads[layer][0]
    if idx_THK.size != grad_TRD.shape[0] * grad_TRD.shape[1]:
      raise ValueError(f"the memory layer at {layer!r} read {idx_THK.shape} slots for "
                       f"{grad_TRD.shape[:2]} rows: call each memory layer once per apply")
    table = finetune.table_of(params, layer)
    by_table.setdefault(table, []).append((idx_THK.reshape(-1), grad_TRD.reshape(-1,
                                                                          grad_TRD.shape[2])))
  out = {}
  for table, parts in by_table.items():
    num_rows = finetune.node_at(params, table).shape[0]
    idx_R = jnp.concatenate([idx for idx, _ in parts])
    grad_RD = jnp.concatenate([grad for _, grad in parts])
    out[table] = sparse_optim.Rows(*sparse_optim.merge_rows(idx_R, grad_RD, num_rows))
  return out


def _no_rows(table_ND: jax.Array) -> sparse_optim.Rows:
  """The `Rows` gradient of a table no layer read: zero rows."""
  return sparse_optim.Rows(jnp.zeros((0,), jnp.int32), jnp.zeros((0, table_ND.shape[1]),
                                                                 table_ND.dtype))


def value_and_row_grad(fun: Callable, params_argnum: int = 0,
                       collections_argnum: int = 1) -> Callable:
  """`jax.value_and_grad(fun, params_argnum, has_aux=True)`, value tables' gradients as `Rows`.

  `fun(..., params, ..., collections, ...) -> (value, aux)` runs a Flax model with variables
  {"params": params, **collections}, the collections mutable, and returns the updated
  collections as the last element of the tuple `aux` (as a trainer objective does). The
  returned function calls `fun` with `collections` plus `VALUE_ROWS` (zero rows, traced once
  with `jax.eval_shape` for their shapes) and `ACCESS`, differentiates w.r.t. the params that
  are not value tables (`optim.value_lr_labels`) and the zero rows, and returns
  ((value, aux without those two collections), grads): grads like params, each value table's
  entry `table_rows`' `Rows`, computed without an N x D buffer. Every memory layer must read its
  table once per call.
  """

  def value_and_grad(*args, **kwargs):
    params, collections = args[params_argnum], args[collections_argnum]
    for name in (VALUE_ROWS, ACCESS):
      if name in collections:
        raise ValueError(f"collections already hold {name!r}; value_and_row_grad adds it")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    tables = [label == optim.VALUE_LABEL for label in jax.tree.leaves(optim.value_lr_labels(params))]
    rest = [leaf for (_, leaf), table in zip(flat, tables) if not table]

    def call(rest, rows):
      others = iter(rest)
      full = treedef.unflatten([leaf if table else next(others)
                                for (_, leaf), table in zip(flat, tables)])
      call_args = list(args)
      call_args[params_argnum] = full
      call_args[collections_argnum] = {**collections, VALUE_ROWS: rows, ACCESS: {}}
      return fun(*call_args, **kwargs)

    shapes = jax.eval_shape(call, rest, {})[1][-1][VALUE_ROWS]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (value, aux), (rest_grads, rows_grads) = jax.value_and_grad(
        call, argnums=(0, 1), has_aux=True)(rest, zeros)
    new_collections = dict(aux[-1])
    new_collections.pop(VALUE_ROWS, None)
    rows_by_table = table_rows(params, new_collections.pop(ACCESS, {}), rows_grads)
    rest_grads = iter(rest_grads)
    grads = treedef.unflatten([rows_by_table.get(finetune.path_name(path), _no_rows(leaf))
                               if table else next(rest_grads)
                               for (path, leaf), table in zip(flat, tables)])
    return (value, (*aux[:-1], new_collections)), grads

  return value_and_grad
