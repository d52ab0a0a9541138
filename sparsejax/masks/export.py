"""Compress masked params into per-structure layouts, and a sparse checkpoint.

  to_bsr        block masks -> (blocks_Zkn, block_mask_RC): the stored blocks in row-major
                order and the NumPy block mask, exactly what `kernels.block_sparse`'s
                `block_sparse_matmul(x, blocks, build_block_schedule(block_mask))` and
                `kernels.block_sparse_linear.BlockSparseLinear` consume. BSR layout (Saad 2003).
  to_condensed  constant fan-in (fan_in, N:M) masks -> (values_OK, idx_OK): output o keeps
                inputs idx[o, :] (ascending) with weights values[o, :]; consumed by
                `sparsejax.masks.condensed.condensed_matmul` / `CondensedLinear`.
  save_sparse / restore_sparse
                a checkpoint of masked params (and the mask) that stores, per sparse leaf, only
                the kept values (in row-major order) and the mask packed 8 entries a byte
                (np.packbits); dense leaves are stored whole. At density d in fp32 a sparse
                leaf costs (4 d + 1/8) bytes per entry instead of 4. Arrays go through Orbax
                (`StandardCheckpointer`), structure names, shapes and dtype names ("bfloat16",
                which NumPy alone cannot name) through JSON.
                Restoring rebuilds params bit-identical to `mask.apply(params)` and the mask,
                optionally placed with the shardings of a target (a different mesh).
"""
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsejax.masks.mask import DENSE, Mask, check_mask_matches, leaf_paths

PyTree = Any
_META = "sparse_meta.json"
_ARRAYS = "arrays"


# ------------------------------------------------------------------------------------- BSR


def to_bsr(w_IO: Any, mask_IO: Any, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(blocks_Zkn, block_mask_RC) of a 2-D kernel whose mask is made of whole (bk, bn) blocks.

  block_mask[r, c] = mask[r bk, c bn]; blocks[z] = w[r_z bk:(r_z+1) bk, c_z bn:(c_z+1) bn] for
  the z-th True block in row-major order. Entries of w outside the mask are dropped.
  """
  w_IO, mask_IO = np.asarray(w_IO), np.asarray(mask_IO, bool)
  bk, bn = block
  if w_IO.ndim != 2 or w_IO.shape != mask_IO.shape:
    raise ValueError(f"to_bsr needs 2-D w and mask of the same shape, got {w_IO.shape} and "
                     f"{mask_IO.shape}")
  rows, cols = w_IO.shape
  if rows % bk or cols % bn:
    raise ValueError(f"block {bk}x{bn} must tile the kernel of shape {w_IO.shape}")
  mask_RkCn = mask_IO.reshape(rows // bk, bk, cols // bn, bn)
  block_mask_RC = mask_RkCn.any(axis=(1, 3))
  if not np.array_equal(mask_RkCn.all(axis=(1, 3)), block_mask_RC):
    raise ValueError(f"mask is not block-structured with block {bk}x{bn}: some block is partly "
                     f"kept")
  w_RCkn = w_IO.reshape(rows // bk, bk, cols // bn, bn).transpose(0, 2, 1, 3)
  return np.ascontiguousarray(w_RCkn[block_mask_RC]), block_mask_RC


def from_bsr(blocks_Zkn: Any, block_mask_RC: Any) -> np.ndarray:
  """The dense kernel `[R bk, C bn]` of BSR blocks (zeros outside the stored blocks)."""
  blocks_Zkn, block_mask_RC = np.asarray(blocks_Zkn), np.asarray(block_mask_RC, bool)
  (rows, cols), (_, bk, bn) = block_mask_RC.shape, blocks_Zkn.shape
  w_RCkn = np.zeros((rows, cols, bk, bn), blocks_Zkn.dtype)
  w_RCkn[block_mask_RC] = blocks_Zkn
  return w_RCkn.transpose(0, 2, 1, 3).reshape(rows * bk, cols * bn)


# ------------------------------------------------------------------------------- condensed


def index_dtype(in_dim: int) -> np.dtype:
  """int16 when every input index fits, else int32."""
  return np.dtype(np.int16) if in_dim <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def to_condensed(w_IO: Any, mask_IO: Any) -> tuple[np.ndarray, np.ndarray]:
  """(values_OK, idx_OK) of a 2-D kernel whose mask keeps the same K inputs count per output.

  idx[o] = the kept input indices of output o, ascending; values[o, k] = w[idx[o, k], o].
  """
  w_IO, mask_IO = np.asarray(w_IO), np.asarray(mask_IO, bool)
  if w_IO.ndim != 2 or w_IO.shape != mask_IO.shape:
    raise ValueError(f"to_condensed needs 2-D w and mask of the same shape, got {w_IO.shape} "
                     f"and {mask_IO.shape}")
  fan_in_O = mask_IO.sum(axis=0)
  if fan_in_O.size and fan_in_O.min() != fan_in_O.max():
    raise ValueError(f"to_condensed needs a constant fan-in per output (fan_in / N:M masks); "
                     f"fan-ins range over [{fan_in_O.min()}, {fan_in_O.max()}]")
  keep = int(fan_in_O[0]) if fan_in_O.size else 0
  mask_OI = mask_IO.T
  # argsort of ~mask (stable) lists the kept inputs first, in ascending order.
  idx_OK = np.argsort(~mask_OI, axis=1, kind="stable")[:, :keep]
  values_OK = np.take_along_axis(w_IO.T, idx_OK, axis=1)
  return values_OK, idx_OK.astype(index_dtype(w_IO.shape[0]))


def from_condensed(values_OK: Any, idx_OK: Any, in_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(w_IO, mask_IO): the dense kernel and mask of a condensed layer."""
  values_OK, idx_OK = np.asarray(values_OK), np.asarray(idx_OK, np.int64)
  out_dim = values_OK.shape[0]
  w_IO = np.zeros((in_dim, out_dim), values_OK.dtype)
  mask_IO = np.zeros((in_dim, out_dim), bool)
  cols_OK = np.broadcast_to(np.arange(out_dim)[:, None], idx_OK.shape)
  w_IO[idx_OK, cols_OK] = values_OK
  mask_IO[idx_OK, cols_OK] = True
  return w_IO, mask_IO


# --------------------------------------------------------------------------- sparse checkpoint


def compress_leaf(w: Any, mask: Any) -> dict[str, np.ndarray]:
  """{"values": w[mask] (row-major), "bits": np.packbits(mask.ravel())}."""
  w, mask = np.asarray(w), np.asarray(mask, bool)
  return {"values": np.ascontiguousarray(w[mask]), "bits": np.packbits(mask.reshape(-1))}


def decompress_leaf(values: Any, bits: Any, shape: tuple[int, ...], dtype: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(w, mask) from `compress_leaf`'s output: zeros outside the mask."""
  size = math.prod(shape)
  mask = np.unpackbits(np.asarray(bits, np.uint8), count=size).astype(bool).reshape(shape)
  w = np.zeros(shape, dtype)
  w[mask] = np.asarray(values, dtype)
  return w, mask


def save_sparse(directory: str, params: PyTree, mask: Mask) -> None:
  """Write masked `params` and `mask` to `directory` (which must not exist yet)."""
  check_mask_matches(params, mask)
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise ValueError(f"sparse checkpoint directory {directory!r} already exists")
  arrays, leaves_meta = {}, []
  masks = mask.flat()
  for i, (path, w) in enumerate(zip(leaf_paths(params), jax.tree.leaves(params))):
    w = np.asarray(jax.device_get(w))
    name = mask.structure_of(path)
    key = f"leaf_{i:05d}"
    if name == DENSE:
      arrays[key] = {"dense": w}
    else:
      arrays[key] = compress_leaf(w, np.asarray(jax.device_get(masks[path])))
    leaves_meta.append({"path": path, "key": key, "structure": name,
                        "shape": list(w.shape), "dtype": w.dtype.name})
  os.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, _ARRAYS), arrays)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, _META), "w") as f:
    json.dump({"leaves": leaves_meta}, f, indent=1)


def restore_sparse(directory: str, target: PyTree = None,
                   shardings: PyTree = None) -> tuple[PyTree, Mask]:
  """(params, mask) from `save_sparse`'s directory.

  Args:
    directory: written by `save_sparse`.
    target: a tree with the params' structure (arrays or ShapeDtypeStructs) to rebuild into;
      default nested dicts split on the '/' of the saved paths.
    shardings: a tree of `jax.sharding.Sharding`s like params; params and mask leaves are
      placed with them (the mask shards exactly like its params). Default: host NumPy arrays.
  """
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, _META)) as f:
    leaves_meta = json.load(f)["leaves"]
  arrays = ocp.StandardCheckpointer().restore(os.path.join(directory, _ARRAYS))
  params_leaves, mask_leaves, structures = [], [], {}
  for meta in leaves_meta:
    stored, shape, dtype = arrays[meta["key"]], tuple(meta["shape"]), jnp.dtype(meta["dtype"])
    if meta["structure"] == DENSE:
      w = np.asarray(stored["dense"], dtype).reshape(shape)
      m = np.ones(shape, bool)
    else:
      w, m = decompress_leaf(stored["values"], stored["bits"], shape, dtype)
      structures[meta["path"]] = meta["structure"]
    params_leaves.append(w)
    mask_leaves.append(m)
  paths = [meta["path"] for meta in leaves_meta]
  if target is not None:
    if leaf_paths(target) != paths:
      raise ValueError(f"target's leaves {leaf_paths(target)} differ from the checkpoint's "
                       f"{paths}")
    treedef = jax.tree.structure(target)
    params = jax.tree.unflatten(treedef, params_leaves)
    mask_tree = jax.tree.unflatten(treedef, mask_leaves)
  else:
    params, mask_tree = _nest(paths, params_leaves), _nest(paths, mask_leaves)
  if shardings is not None:
    params = jax.tree.map(jax.device_put, params, shardings)
    mask_tree = jax.tree.map(jax.device_put, mask_tree, shardings)
  return params, Mask.from_leaves(mask_tree, structures)


def _nest(paths: list[str], leaves: list[Any]) -> dict[str, Any]:
  """Nested dicts from '/'-joined paths."""
  tree: dict[str, Any] = {}
  for path, leaf in zip(paths, leaves):
    *parents, last = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def directory_bytes(directory: str) -> int:
  """Bytes of all files under `directory` (what the checkpoint costs on disk)."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)
