"""Index-based dispatch of tokens to expert rows and weighted combine back.

A plan places every kept (token, choice) pair in one row of an expert-major layout:
  * capacity plans: row = e * C + slot, an `[E * C, D]` buffer (reshape to `[E, C, D]`);
    rows no token claimed are 0;
  * dropless plans: row = start_e + slot with start_e = sum_{e' < e} size_e', the
    expert-sorted `[T * K, D]` layout of `kernels.gmm.gmm` (MegaBlocks, Gale et al., 2023);
    rows past sum_e size_e are 0.
Dispatch is one row gather, combine one row gather and a gate-weighted sum over the K
choices; their gradients are row gathers too (by `row_index` resp. `pair_of_row`, no
scatter-add). Nothing builds a one-hot `[T, E, C]` tensor.
"""
import jax
import jax.numpy as jnp

from sparsejax.moe.plan import DispatchPlan
from sparsejax.moe.plan import group_sizes


def num_rows(plan: DispatchPlan) -> int:
  """Rows of the plan's expert layout: E * C with a capacity, else T * K."""
  if plan.capacity is None:
    return plan.num_tokens * plan.k
  return plan.num_experts * plan.capacity


def row_index(plan: DispatchPlan) -> jax.Array:
  """Row of each pair in the expert layout, int32 `[T, K]`; `num_rows(plan)` where dropped."""
  if plan.capacity is None:
    sizes_E = group_sizes(plan)
    start_TK = (jnp.cumsum(sizes_E) - sizes_E)[plan.expert_TK]
  else:
    start_TK = plan.expert_TK * plan.capacity
  return jnp.where(plan.keep_TK, start_TK + plan.slot_TK, num_rows(plan)).astype(jnp.int32)


def pair_of_row(plan: DispatchPlan) -> jax.Array:
  """Flat pair index t * K + k held by each row, int32 `[R]`; T * K for empty rows."""
  num_pairs = plan.num_tokens * plan.k
  pair_R = jnp.full((num_rows(plan),), num_pairs, jnp.int32)
  return pair_R.at[row_index(plan).reshape(-1)].set(
      jnp.arange(num_pairs, dtype=jnp.int32), mode="drop", unique_indices=True)


def dispatch(x_TD: jax.Array, plan: DispatchPlan) -> jax.Array:
  """Expert rows x_R[r] = x[token(r)], 0 for empty rows: `[R, D]`."""
  token_R = pair_of_row(plan) // plan.k
  return _take_rows(x_TD, token_R, row_index(plan))


def combine(y_RD: jax.Array, plan: DispatchPlan) -> jax.Array:
  """Token outputs y_t = sum_k gate_tk * y_R[row_tk] over kept pairs, accumulated in float32."""
  row_TK = row_index(plan)
  y_PD = _take_rows(y_RD, row_TK.reshape(-1), pair_of_row(plan)[:, None])
  y_TKD = y_PD.reshape(plan.num_tokens, plan.k, -1).astype(jnp.float32)
  y_TD = jnp.einsum("tkd,tk->td", y_TKD, plan.gate_TK.astype(jnp.float32))
  return y_TD.astype(y_RD.dtype)


@jax.custom_vjp
def _take_rows(x_SD: jax.Array, source_R: jax.Array, targets_SJ: jax.Array) -> jax.Array:
  """y[r] = x[source[r]], 0 where source[r] is out of range.

  targets[s] lists the rows r with source[r] = s (out-of-range entries for none), so the
  gradient dx[s] = sum_j dy[targets[s, j]] is a gather too: XLA's scatter-add, the transpose
  of a plain gather, is several times slower on CPU.
  """
  del targets_SJ
  return jnp.take(x_SD, source_R, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_SD, source_R, targets_SJ):
  return _take_rows(x_SD, source_R, targets_SJ), targets_SJ


def _take_rows_bwd(targets_SJ, dy_RD):
  dx_SJD = jnp.take(dy_RD, targets_SJ, axis=0, mode="fill", fill_value=0)
  return jnp.sum(dx_SJD, axis=1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)
