"""Unstructured sparse weight layouts (CSR, bitmap) with a gather matmul and a sparse backward.

A kernel w_IO (y = x w) with an arbitrary mask is stored output-major, as rows of w^T: entry p
is (row o_p, input i_p, value v_p), ordered by (o, i), padded to a static capacity C >= nnz with
v = 0 at a sentinel (o = O, i = I) that every sum drops.

  CSR     indptr_P (P = O + 1, output o's entries are p in [indptr[o], indptr[o+1])), indices_C
          (i_p) and values_C, plus the transposed layout used for dx: transpose_perm_C (the
          entries sorted by (i, o), i.e. the CSR of w itself) with transpose_indptr (I + 1), and
          the static longest row / column lengths. Saad 2003, "Iterative Methods for Sparse
          Linear Systems" sec. 3.4.
  bitmap  bits: the mask of w^T packed 8 entries a byte (np.packbits, row-major [O, I]), and
          values_C in the same order. (I O / 8 + 4 nnz bytes against CSR's 4 (O + 1) + 8 nnz.)
          SparAMX (Abouelhamayed et al. 2025) and the bitmap formats of sparse CPU inference.

  y[b, o]  = sum_{p: o_p = o} x[b, i_p] v_p           (gather x, sum over the entries of o)
  dx[b, i] = sum_{p: i_p = i} dy[b, o_p] v_p          (the same on the transposed order)
  dv_p     = sum_b x[b, i_p] dy[b, o_p]               (dW only at the stored entries)

`implementation`: "gather" runs the sums above one batch row at a time, O(nnz) per row, the
online-inference path. For CSR each output's entries are first laid out padded to the longest
row (ELLPACK, [O, K_max] positions from indptr, once per call), so a row is a gather and a
multiply-sum, as `condensed_matmul`; the bitmap decodes its entries' coordinates from the bits
(O(I O) per call) and sums with a sorted segment sum. "densify" scatters the values into a dense
w, then one matmul, and takes dv = (x^T dy) at the stored entries (large batches, where dense
matmuls win); "auto" picks gather for B <= condensed.GATHER_MAX_BATCH for CSR, and always the
bitmap's own densify (decoding w by prefix counts of the bits, a gather; see `bitmap_matmul`).
Gradients go through custom_vjps. Nikdan et al. 2023, "SparseProp: Efficient Sparse Backpropagation for Faster
Training of Neural Networks".
"""
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.masks import condensed

IMPLEMENTATIONS = ("auto", "gather", "densify")
# Bit k (most significant first, as np.packbits) of each byte value, and the set bits before it.
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int32)
_BYTE_PREFIX = np.cumsum(_BYTE_BITS, axis=1) - _BYTE_BITS


@flax.struct.dataclass
class CSR:
  """Output-major CSR of w_IO (rows of w^T) with a static capacity; see the module docstring."""
  indptr: jax.Array           # [O + 1] int32
  indices: jax.Array          # [C] int32 input ids (I at padding)
  values: jax.Array           # [C]
  transpose_perm: jax.Array   # [C] int32: entries sorted by (input, output), padding last
  transpose_indptr: jax.Array  # [I + 1] int32: input i's entries are transpose_perm[ptr[i]:..]
  in_dim: int = flax.struct.field(pytree_node=False)
  max_row_nnz: int = flax.struct.field(pytree_node=False)
  max_col_nnz: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Bitmap:
  """Packed mask of w^T ([O, I] row-major, 8 a byte) and its kept values in that order."""
  bits: jax.Array             # [ceil(O I / 8)] uint8
  values: jax.Array           # [C], zeros past nnz
  in_dim: int = flax.struct.field(pytree_node=False)
  out_dim: int = flax.struct.field(pytree_node=False)


def to_csr(w_IO: Any, mask_IO: Any, capacity: int | None = None) -> CSR:
  """The CSR of the kept entries of w (host-side NumPy); capacity defaults to max(nnz, 1)."""
  w_IO, mask_IO = _check_dense(w_IO, mask_IO)
  inputs, outputs = w_IO.shape
  capacity = _check_capacity(mask_IO, capacity)
  rows_N, cols_N = np.nonzero(mask_IO.T)  # row-major over [O, I]: sorted by (o, i)
  nnz = rows_N.size
  indices_C = np.full(capacity, inputs, np.int32)
  indices_C[:nnz] = cols_N
  values_C = np.zeros(capacity, w_IO.dtype)
  values_C[:nnz] = w_IO[cols_N, rows_N]
  row_nnz_O = np.bincount(rows_N, minlength=outputs)
  col_nnz_I = np.bincount(cols_N, minlength=inputs)
  perm_N = np.lexsort((rows_N, cols_N))
  perm_C = np.concatenate([perm_N, np.arange(nnz, capacity)]).astype(np.int32)
  return CSR(jnp.asarray(np.concatenate([[0], np.cumsum(row_nnz_O)]), jnp.int32),
             jnp.asarray(indices_C), jnp.asarray(values_C), jnp.asarray(perm_C),
             jnp.asarray(np.concatenate([[0], np.cumsum(col_nnz_I)]), jnp.int32), inputs,
             int(row_nnz_O.max(initial=0)), int(col_nnz_I.max(initial=0)))


def from_csr(csr: CSR) -> tuple[np.ndarray, np.ndarray]:
  """(w_IO, mask_IO) of a CSR layout."""
  rows_C, cols_C = (np.asarray(a) for a in _csr_coords(csr))
  return _dense_of(rows_C, cols_C, np.asarray(csr.values), csr.in_dim,
                   np.asarray(csr.indptr).size - 1)


def to_bitmap(w_IO: Any, mask_IO: Any, capacity: int | None = None) -> Bitmap:
  """The bitmap layout of the kept entries of w (host-side NumPy); capacity defaults to
  max(nnz, 1)."""
  w_IO, mask_IO = _check_dense(w_IO, mask_IO)
  capacity = _check_capacity(mask_IO, capacity)
  kept = w_IO.T[mask_IO.T]
  values_C = np.zeros(capacity, w_IO.dtype)
  values_C[:kept.size] = kept
  return Bitmap(jnp.asarray(np.packbits(mask_IO.T.reshape(-1))), jnp.asarray(values_C),
                w_IO.shape[0], w_IO.shape[1])


def from_bitmap(bitmap: Bitmap) -> tuple[np.ndarray, np.ndarray]:
  """(w_IO, mask_IO) of a bitmap layout."""
  rows_C, cols_C = (np.asarray(a) for a in _bitmap_coords(bitmap))
  return _dense_of(rows_C, cols_C, np.asarray(bitmap.values), bitmap.in_dim, bitmap.out_dim)


def csr_matmul(x_BI: jax.Array, csr: CSR, implementation: str = "auto") -> jax.Array:
  """y = x w for x `[..., I]` and w in CSR (module docstring); differentiable in x and values."""
  rows_C, cols_C = _csr_coords(csr)
  capacity = csr.values.shape[0]
  ell = (_ell_positions(csr.indptr, jnp.arange(capacity), csr.max_row_nnz, capacity),
         _ell_positions(csr.transpose_indptr, csr.transpose_perm, csr.max_col_nnz, capacity))
  return _matmul(x_BI, csr.values, rows_C, cols_C, csr.transpose_perm, ell, csr.in_dim,
                 csr.indptr.shape[0] - 1, implementation)


def bitmap_matmul(x_BI: jax.Array, bitmap: Bitmap, implementation: str = "auto") -> jax.Array:
  """y = x w for x `[..., I]` and w as a bitmap.

  "densify" (what "auto" picks at every batch, since reading the bits costs O(I O) anyway)
  decodes w^T by prefix counts, w_flat[j] = values[popcount(bits[:j])] where bit j is set, a
  gather (no scatter), then one matmul; its gradient in the values is dW at the stored entries.
  "gather" decodes the entries' coordinates (o_p, i_p) from the bits and sums as `csr_matmul`
  does, with a sorted segment sum (the transposed order is a stable sort).
  """
  _matmul_checks(x_BI, bitmap.in_dim, implementation)
  if implementation in ("auto", "densify"):
    return jnp.dot(x_BI, _decode_bitmap(bitmap.bits, bitmap.values.astype(x_BI.dtype),
                                        bitmap.in_dim, bitmap.out_dim).T)
  rows_C, cols_C = _bitmap_coords(bitmap)
  perm_C = jnp.argsort(cols_C, stable=True).astype(jnp.int32)
  return _matmul(x_BI, bitmap.values, rows_C, cols_C, perm_C, None, bitmap.in_dim,
                 bitmap.out_dim, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _decode_bitmap(bits, values_C, in_dim, out_dim):
  """w_OI: w_flat[j] = values[(count of set bits before j)] where bit j is set, else 0.

  The prefix count is taken per byte (a cumsum over I O / 8 byte popcounts) plus the set bits
  before j inside its byte (a [256, 8] table): 8x less scan work than a cumsum over the bits.
  """
  byte_G = bits.astype(jnp.int32)
  bits_G8 = jnp.asarray(_BYTE_BITS)[byte_G]
  count_G = jnp.asarray(_BYTE_BITS.sum(axis=1))[byte_G]
  pos_G8 = (jnp.cumsum(count_G) - count_G)[:, None] + jnp.asarray(_BYTE_PREFIX)[byte_G]
  w_G8 = jnp.where(bits_G8 == 1, jnp.take(values_C, pos_G8, mode="clip"), 0)
  return w_G8.reshape(-1)[:in_dim * out_dim].reshape(out_dim, in_dim)


def _decode_bitmap_fwd(bits, values_C, in_dim, out_dim):
  return _decode_bitmap(bits, values_C, in_dim, out_dim), (bits, values_C)


def _decode_bitmap_bwd(in_dim, out_dim, res, dw_OI):
  bits, values_C = res
  size = in_dim * out_dim
  mask_J = jnp.unpackbits(bits, count=size).astype(bool)
  (pos_C,) = jnp.nonzero(mask_J, size=values_C.shape[0], fill_value=size)
  return None, jnp.take(dw_OI.reshape(-1), pos_C, mode="fill", fill_value=0)


_decode_bitmap.defvjp(_decode_bitmap_fwd, _decode_bitmap_bwd)


def _check_dense(w_IO: Any, mask_IO: Any) -> tuple[np.ndarray, np.ndarray]:
  w_IO, mask_IO = np.asarray(w_IO), np.asarray(mask_IO, bool)
  if w_IO.ndim != 2 or w_IO.shape != mask_IO.shape:
    raise ValueError(f"need 2-D w and mask of the same shape, got {w_IO.shape} and "
                     f"{mask_IO.shape}")
  return w_IO, mask_IO


def _check_capacity(mask_IO: np.ndarray, capacity: int | None) -> int:
  nnz = int(mask_IO.sum())
  if capacity is None:
    return max(nnz, 1)  # one padding entry for an empty mask: the gathers need a non-empty array
  if capacity < max(nnz, 1):
    raise ValueError(f"capacity={capacity} must be >= the mask's {nnz} kept entries and >= 1")
  return int(capacity)


def _dense_of(rows_C, cols_C, values_C, inputs, outputs):
  valid = rows_C < outputs
  w_IO = np.zeros((inputs, outputs), values_C.dtype)
  mask_IO = np.zeros((inputs, outputs), bool)
  w_IO[cols_C[valid], rows_C[valid]] = values_C[valid]
  mask_IO[cols_C[valid], rows_C[valid]] = True
  return w_IO, mask_IO


def _csr_coords(csr: CSR) -> tuple[jax.Array, jax.Array]:
  """(o_p, i_p) of every entry; past nnz, searchsorted gives the sentinel row O."""
  capacity = csr.indices.shape[0]
  rows_C = jnp.searchsorted(csr.indptr, jnp.arange(capacity, dtype=csr.indptr.dtype),
                            side="right") - 1
  return rows_C.astype(jnp.int32), csr.indices.astype(jnp.int32)


def _ell_positions(indptr_S1: jax.Array, order_C: jax.Array, width: int,
                   capacity: int) -> jax.Array:
  """pos_SK = order[indptr[s] + k] for k < row s's length, else the sentinel C (ELLPACK)."""
  flat_SK = indptr_S1[:-1, None] + jnp.arange(width, dtype=indptr_S1.dtype)[None, :]
  inside_SK = flat_SK < indptr_S1[1:, None]
  return jnp.where(inside_SK, jnp.take(order_C, flat_SK, mode="clip"), capacity)


def _bitmap_coords(bitmap: Bitmap) -> tuple[jax.Array, jax.Array]:
  size = bitmap.in_dim * bitmap.out_dim
  mask_flat = jnp.unpackbits(bitmap.bits, count=size).astype(bool)
  (pos_C,) = jnp.nonzero(mask_flat, size=bitmap.values.shape[0], fill_value=size)
  rows_C = (pos_C // bitmap.in_dim).astype(jnp.int32)
  cols_C = jnp.where(rows_C < bitmap.out_dim, pos_C % bitmap.in_dim, bitmap.in_dim)
  return rows_C, cols_C.astype(jnp.int32)


def _matmul_checks(x_BI, in_dim, implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if x_BI.shape[-1] != in_dim:
    raise ValueError(f"x's last dim must be the layout's in_dim={in_dim}, got {x_BI.shape}")


def _matmul(x_BI, values_C, rows_C, cols_C, perm_C, ell, in_dim, out_dim, implementation):
  _matmul_checks(x_BI, in_dim, implementation)
  lead = x_BI.shape[:-1]
  x_BI = x_BI.reshape(-1, in_dim)
  if implementation == "auto":
    implementation = "gather" if x_BI.shape[0] <= condensed.GATHER_MAX_BATCH else "densify"
  y_BO = _sparse_matmul(x_BI, values_C.astype(x_BI.dtype), (rows_C, cols_C, perm_C, ell),
                        out_dim, implementation)
  return y_BO.reshape(*lead, out_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sparse_matmul(x_BI, values_C, coords, out_dim, implementation):
  """y_BO[b, o] = sum_{p: rows[p] = o} x[b, cols[p]] values[p] (rows sorted, sentinel = O).

  coords = (rows_C, cols_C, perm_C, ell): perm sorts the entries by (col, row); ell is None or
  the ELLPACK positions (pos_OK, pos_IK) of the entries of each output and of each input.
  """
  rows_C, cols_C, _, ell = coords
  if implementation == "densify":
    return jnp.dot(x_BI, _densify(values_C, cols_C, rows_C, x_BI.shape[1], out_dim))
  if ell is not None:
    return _ell_rows(x_BI, values_C, cols_C, ell[0])
  return _segment_rows(x_BI, values_C, cols_C, rows_C, out_dim)


def _densify(values_C, rows_C, cols_C, num_rows, num_cols):
  """w[rows[p], cols[p]] = values[p]; sentinel entries dropped."""
  return jnp.zeros((num_rows, num_cols), values_C.dtype).at[rows_C, cols_C].add(
      values_C, mode="drop")


def _ell_rows(x_BI, values_C, gather_C, pos_SK):
  """out[b, s] = sum_k x[b, gather[pos[s, k]]] values[pos[s, k]] (pos = C: nothing)."""
  gather_SK = jnp.take(gather_C, pos_SK, mode="fill", fill_value=x_BI.shape[1])
  values_SK = jnp.take(values_C, pos_SK, mode="fill", fill_value=0)
  # One row at a time (lax.map): XLA's CPU gather is much slower batched (see condensed.py).
  return jax.lax.map(lambda x_I: jnp.sum(
      jnp.take(x_I, gather_SK, mode="fill", fill_value=0) * values_SK, axis=-1), x_BI)


def _segment_rows(x_BI, values_C, gather_C, segment_C, num_segments):
  """out[b, s] = sum_{p: segment[p] = s} x[b, gather[p]] values[p] (segment sorted)."""
  def row(x_I):
    x_C = jnp.take(x_I, gather_C, mode="fill", fill_value=0)
    return jax.ops.segment_sum(x_C * values_C, segment_C, num_segments,
                               indices_are_sorted=True)

  return jax.lax.map(row, x_BI)


def _sparse_matmul_fwd(x_BI, values_C, coords, out_dim, implementation):
  return _sparse_matmul(x_BI, values_C, coords, out_dim, implementation), (x_BI, values_C,
                                                                          coords)


def _sparse_matmul_bwd(out_dim, implementation, res, dy_BO):
  x_BI, values_C, coords = res
  rows_C, cols_C, perm_C, ell = coords
  in_dim = x_BI.shape[1]
  if implementation == "densify":
    w_OI = _densify(values_C, rows_C, cols_C, out_dim, in_dim)
    dx_BI = jnp.dot(dy_BO, w_OI)
    dw_IO = jnp.dot(x_BI.T, dy_BO)
    dvalues_C = dw_IO.at[cols_C, rows_C].get(mode="fill", fill_value=0)
    return dx_BI, dvalues_C, None
  # dx = dy w^T on the transposed order: gather dy at o_p, summed over the entries of each i.
  if ell is not None:
    dx_BI = _ell_rows(dy_BO, values_C, rows_C, ell[1])
  else:
    dx_BI = _segment_rows(dy_BO, values_C[perm_C], rows_C[perm_C], cols_C[perm_C], in_dim)
  x_BC = jnp.take(x_BI, cols_C, axis=1, mode="fill", fill_value=0)
  dy_BC = jnp.take(dy_BO, rows_C, axis=1, mode="fill", fill_value=0)
  return dx_BI, jnp.sum(x_BC * dy_BC, axis=0), None


_sparse_matmul.defvjp(_sparse_matmul_fwd, _sparse_matmul_bwd)
