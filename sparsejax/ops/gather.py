"""Weighted sum of k gathered table rows per token, with a gradient that touches only those rows.

The kernels below work on small pieces: one [T, D] slice per slot k, or the [C, K, D] rows of C
tokens at a time. On CPU XLA this keeps the working set in cache, where the one-shot forms
(`jnp.take` of all [T, K, D] rows, or one scatter-add of [T K, D] updates) write and re-read a
[T, K, D] buffer and run 4-20x slower (measured on a 2-core x86 CPU, T=4096, D=256, K=32).
Out-of-range indices are clamped to [0, N) in the forward and the backward pass alike.
"""
import jax
import jax.numpy as jnp
import numpy as np

# Slots per loop iteration in `gather_rows_sum` for outputs of at least _UNROLL_MIN_ENTRIES
# entries (10-30 % faster there); smaller outputs run one slot per iteration, because XLA CPU
# fuses an unrolled body with a preceding top_k into a loop 20x slower (T=128, D=32, k=4).
_SUM_UNROLL = 8
_UNROLL_MIN_ENTRIES = 2**15
# `gather_rows_dot` and `scatter_rows_add` handle about this many [C, K, D] entries at a time
# (2 MiB in float32).
_CHUNK_ENTRIES = 2**19


def gather_rows_sum(table_ND: jax.Array, idx_TK: jax.Array, weights_TK: jax.Array) -> jax.Array:
  """out[t] = sum_k weights[t, k] table[idx[t, k]]  ([T, D]; gather_decode's forward pass).

  Loops over k, accumulating one gathered [T, D] slice per slot: O(T K D) work, O(T D) memory.
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (sparse TopK decoder kernel).
  """
  table_ND, idx_TK = jnp.asarray(table_ND), jnp.asarray(idx_TK)
  weights_TK = jnp.asarray(weights_TK, table_ND.dtype)

  def add_slot(k, out_TD):
    rows_TD = jnp.take(table_ND, idx_TK[:, k], axis=0, mode="clip")
    return out_TD + weights_TK[:, k, None] * rows_TD

  out_TD = jnp.zeros((idx_TK.shape[0], table_ND.shape[1]), table_ND.dtype)
  unroll = _SUM_UNROLL if out_TD.size >= _UNROLL_MIN_ENTRIES else 1
  return jax.lax.fori_loop(0, idx_TK.shape[1], add_slot, out_TD, unroll=unroll)


def gather_rows_dot(table_ND: jax.Array, idx_TK: jax.Array, y_TD: jax.Array) -> jax.Array:
  """out[t, k] = <y[t], table[idx[t, k]]>  ([T, K]; the gradient of gather_rows_sum's weights).

  C tokens at a time: gather their [C, K, D] rows, contract with y over D. O(T K D) work.
  """
  table_ND, idx_TK, y_TD = jnp.asarray(table_ND), jnp.asarray(idx_TK), jnp.asarray(y_TD)
  idx_GCK, y_GCD = chunk_tokens((idx_TK, y_TD), idx_TK.shape[1] * y_TD.shape[1], _CHUNK_ENTRIES)

  def dot_chunk(chunk):
    idx_CK, y_CD = chunk
    rows_CKD = jnp.take(table_ND, idx_CK, axis=0, mode="clip")
    return jnp.einsum("ckd,cd->ck", rows_CKD, y_CD)

  out_GCK = jax.lax.map(dot_chunk, (idx_GCK, y_GCD))
  return out_GCK.reshape(-1, idx_TK.shape[1])[:idx_TK.shape[0]]


def scatter_rows_add(idx_TK: jax.Array, weights_TK: jax.Array, y_TD: jax.Array,
                     num_rows: int) -> jax.Array:
  """out[n] = sum over (t, k) with idx[t, k] = n of weights[t, k] y[t]  ([N, D]; = S^T y).

  S is the [T, N] matrix holding `weights` at `idx` (repeats add): the gradient of
  gather_rows_sum's table. C tokens at a time: scatter-add their [C K, D] updates. O(T K D) work.
  """
  idx_TK, y_TD = jnp.asarray(idx_TK), jnp.asarray(y_TD)
  weights_TK = jnp.asarray(weights_TK, y_TD.dtype)
  k, width = idx_TK.shape[1], y_TD.shape[1]
  idx_TK = jnp.clip(idx_TK, 0, num_rows - 1)  # as jnp.take's "clip" (.at[] would wrap negatives)
  chunks = chunk_tokens((idx_TK, weights_TK, y_TD), k * width, _CHUNK_ENTRIES)

  def scatter_chunk(out_ND, chunk):
    idx_CK, weights_CK, y_CD = chunk
    updates_CKD = weights_CK[:, :, None] * y_CD[:, None, :]
    return out_ND.at[idx_CK.reshape(-1)].add(updates_CKD.reshape(-1, width),
                                             mode="promise_in_bounds"), None

  out_ND, _ = jax.lax.scan(scatter_chunk, jnp.zeros((num_rows, width), y_TD.dtype), chunks)
  return out_ND


def chunk_tokens(arrays_T: tuple[jax.Array, ...], entries_per_token: int,
                 budget: int) -> tuple[jax.Array, ...]:
  """Each [T, ...] array zero-padded to G C tokens and reshaped to [G, C, ...].

  C = budget // entries_per_token, clipped to [1, T]: a chunk holds ~`budget` entries.
  """
  num_tokens = arrays_T[0].shape[0]
  chunk = max(1, min(num_tokens, budget // entries_per_token))
  num_chunks = -(-num_tokens // chunk)

  def split(a):
    padded = jnp.pad(a, [(0, num_chunks * chunk - num_tokens)] + [(0, 0)] * (a.ndim - 1))
    return padded.reshape(num_chunks, chunk, *a.shape[1:])

  return tuple(split(a) for a in arrays_T)


def gather_decode(table_ND: jax.Array, idx_TK: jax.Array, weights_TK: jax.Array) -> jax.Array:
  """out[t] = sum_k weights[t, k] * table[idx[t, k]]  (an embedding bag; [T, D]).

  Equals `dense_TN @ table_ND` for the [T, N] matrix holding `weights` at `idx`, at O(T K D)
  cost instead of O(T N D). Gradients: d weights[t, k] = <g[t], table[idx[t, k]]> and
  d table[n] = sum over (t, k) with idx[t, k] = n of weights[t, k] g[t] (a scatter-add), both
  O(T K D). Indices should lie in [0, N) (others are clamped); repeated indices in a row add up.
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (sparse TopK decoder kernel).
  """
  if table_ND.ndim != 2:
    raise ValueError(f"table_ND must be [N, D]; got shape {table_ND.shape}")
  if idx_TK.ndim != 2 or not jnp.issubdtype(idx_TK.dtype, jnp.integer):
    raise ValueError(f"idx_TK must be an integer [T, K] array; got {idx_TK.dtype}{idx_TK.shape}")
  if weights_TK.shape != idx_TK.shape:
    raise ValueError(f"weights_TK shape {weights_TK.shape} must equal idx_TK shape "
                     f"{idx_TK.shape}")
  return _gather_decode(table_ND, idx_TK, weights_TK)


@jax.custom_vjp
def _gather_decode(table_ND, idx_TK, weights_TK):
  return gather_rows_sum(table_ND, idx_TK, weights_TK)


def _gather_decode_fwd(table_ND, idx_TK, weights_TK):
  return gather_rows_sum(table_ND, idx_TK, weights_TK), (table_ND, idx_TK, weights_TK)


def _gather_decode_bwd(residuals, g_TD):
  table_ND, idx_TK, weights_TK = residuals
  d_weights_TK = gather_rows_dot(table_ND, idx_TK, g_TD).astype(weights_TK.dtype)
  d_table_ND = scatter_rows_add(idx_TK, weights_TK, g_TD, table_ND.shape[0])
  d_idx_TK = np.zeros(idx_TK.shape, jax.dtypes.float0)  # integer inputs take float0
  return d_table_ND.astype(table_ND.dtype), d_idx_TK, d_weights_TK


_gather_decode.defvjp(_gather_decode_fwd, _gather_decode_bwd)
