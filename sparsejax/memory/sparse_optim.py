"""Row-sparse optimizers for memory value tables: Adam / Adagrad steps on only the rows read.

A product-key memory reads R << N rows of its N x D value table per step, so the table's
gradient is zero outside those rows. A dense AdamW still reads and writes the whole table and
both N x D moments every step; here a step gathers the touched rows' parameters and state,
updates them, and scatters them back (`.at[idx].get` / `.at[idx].set` only): O(R D) per step.

Untouched rows are treated lazily, as sparse ("lazy") Adam does:
* their parameters, moments and counters are not read or written at all (bit-identical);
* their moments do not decay, and their momentum does not keep moving them (dense AdamW would
  move a row by -lr m_hat / (sqrt(v_hat) + eps) even at zero gradient);
* their decoupled weight decay is deferred: each row keeps `last_step`, the step it was last
  updated (0 = never), and when it is next touched at step t it is first multiplied by
  (1 - lr_t wd)^(t - last_step), i.e. the decay of the t - last_step - 1 steps it missed and of
  step t itself, at the current step's learning rate (exact for a constant learning rate).
  A row never touched keeps its initial value (its pending decay is never applied).
Adam's bias correction uses the row's own update count c (`count`), so a row behaves as an Adam
over the steps that touched it: touched every step, it equals `optax.adamw` exactly.

Two forms: `row_adam_step` / `row_adagrad_step` take explicit unique row indices (e.g. the
memory's read indices merged by `merge_rows`) and cost O(R D); `row_adamw` / `row_adagrad` are
optax transformations. Given a table's gradient as `Rows` (unique row indices and their
gradient, e.g. from `sparsejax.memory.row_grad.value_and_row_grad`) they cost O(R D) and return
the update as `Rows`; `tree_norm`, `clip_by_global_norm` and `apply_updates` are optax's on
trees holding `Rows` (what `config.train.memory_values="sparse"` runs). Given a dense gradient
they find the touched rows (`touched_rows`, one N x D compare and an O(N) compaction to a static
capacity) and return a dense delta that is zero outside them.

Berges et al. 2024, "Memory Layers at Scale" (sparse updates of the memory values); Lample et al.
2019, "Large Memory Layers with Product Keys" (sparse value updates); Duchi et al. 2011 and the
row-wise Adagrad of DLRM / FBGEMM embedding tables.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class RowAdamState(NamedTuple):
  """Row-wise Adam state of one N x D table: step t, per-row update count and last update step
  (int32 [N]), per-entry first and second moments ([N, D], float32)."""
  step: jax.Array
  count_N: jax.Array
  last_step_N: jax.Array
  mu_ND: jax.Array
  nu_ND: jax.Array


class Rows(NamedTuple):
  """A value table's gradient or update in row form: row idx_R[r] holds rows_RD[r], every other
  row 0. idx_R: unique int32 row indices, ascending, padded with N (padded rows are 0)."""
  idx_R: jax.Array
  rows_RD: jax.Array


def is_rows(tree) -> bool:
  """Whether `tree` is a `Rows` (the `is_leaf` for tree maps that treat it as one leaf)."""
  return isinstance(tree, Rows)


class RowAdagradState(NamedTuple):
  """Row-wise Adagrad state of one N x D table: step t, per-row last update step (int32 [N]) and
  per-row sum over updates of the mean squared gradient (float32 [N])."""
  step: jax.Array
  last_step_N: jax.Array
  sum_sq_N: jax.Array


def _check_table(table_ND: jax.Array) -> None:
  if table_ND.ndim != 2:
    raise ValueError(f"a value table must have shape (N, D), got {table_ND.shape}")


def _check_capacity(capacity: int) -> None:
  if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f"capacity must be a positive int (rows updated per step), got {capacity!r}")


def touched_rows(grad_ND: jax.Array, capacity: int) -> jax.Array:
  """idx_R: the rows of `grad` with any non-zero entry, ascending, padded with N; R = min(cap, N).

  idx = nonzero(any(g_n != 0))[:R]; an O(N D) compare and an O(N) compaction (cheaper than a
  top-k over row norms). With more than R non-zero rows the highest ones are left out, so pick
  `capacity` >= the rows a step can read (tokens x heads x k, summed over the table's readers).
  """
  _check_table(grad_ND)
  _check_capacity(capacity)
  num_rows = grad_ND.shape[0]
  return jnp.nonzero(jnp.any(grad_ND != 0, axis=1), size=min(capacity, num_rows),
                     fill_value=num_rows)[0].astype(jnp.int32)


def merge_rows(idx_R: jax.Array, grad_RD: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """(unique idx_R padded with N, summed grad_RD): repeated reads of a row added into one row.

  g'_j = sum over r with idx_r = u_j of g_r, for the unique indices u ascending; O(R log R + R D).
  """
  if idx_R.ndim != 1 or grad_RD.ndim != 2 or grad_RD.shape[0] != idx_R.shape[0]:
    raise ValueError(f"idx must be (R,) and grad (R, D), got {idx_R.shape} and {grad_RD.shape}")
  unique_R, inverse_R = jnp.unique(idx_R, size=idx_R.shape[0], fill_value=num_rows,
                                   return_inverse=True)
  summed_RD = jnp.zeros_like(grad_RD).at[inverse_R.reshape(-1)].add(grad_RD)
  return unique_R.astype(jnp.int32), summed_RD


def init_row_adam(table_ND: jax.Array) -> RowAdamState:
  """Zero row-wise Adam state for an N x D table."""
  _check_table(table_ND)
  num_rows = table_ND.shape[0]
  return RowAdamState(jnp.zeros((), jnp.int32), jnp.zeros((num_rows,), jnp.int32),
                      jnp.zeros((num_rows,), jnp.int32), jnp.zeros(table_ND.shape, jnp.float32),
                      jnp.zeros(table_ND.shape, jnp.float32))


def init_row_adagrad(table_ND: jax.Array) -> RowAdagradState:
  """Zero row-wise Adagrad state for an N x D table."""
  _check_table(table_ND)
  num_rows = table_ND.shape[0]
  return RowAdagradState(jnp.zeros((), jnp.int32), jnp.zeros((num_rows,), jnp.int32),
                         jnp.zeros((num_rows,), jnp.float32))


def _decayed(rows_RD: jax.Array, last_R: jax.Array, step: jax.Array, lr: jax.Array,
             weight_decay: float) -> jax.Array:
  """rows (1 - lr wd)^(t - last): the deferred decoupled weight decay, in float32."""
  factor_R = (1.0 - lr * weight_decay) ** (step - last_R).astype(jnp.float32)
  return rows_RD.astype(jnp.float32) * factor_R[:, None]


def _after(last_R: jax.Array, step: jax.Array) -> jax.Array:
  """step for every row (last < step), computed from the gathered `last`: a scatter of values
  that depend on the gather lets XLA update last_step in place instead of copying its N
  entries first."""
  return jnp.maximum(last_R, step)


def row_adam_step(table_ND: jax.Array, state: RowAdamState, idx_R: jax.Array, grad_RD: jax.Array,
                  learning_rate: jax.Array, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0) -> tuple[jax.Array, RowAdamState]:
  """Lazy row-wise AdamW on the rows `idx` (unique; entries equal to N are skipped).

  At step t, for each touched row n with its count c = count_n + 1:
    mu_n <- b1 mu_n + (1 - b1) g_n,  nu_n <- b2 nu_n + (1 - b2) g_n^2
    V_n <- V_n (1 - lr wd)^(t - last_n) - lr (mu_n / (1 - b1^c)) / (sqrt(nu_n / (1 - b2^c)) + eps)
  and last_n <- t; every other row and its state is left as is. O(R D) when `table` and `state`
  are donated (else XLA copies them once).
  Loshchilov & Hutter 2019 (AdamW); Berges et al. 2024, "Memory Layers at Scale".
  """
  _check_table(table_ND)
  new_RD, new_state = _adam_rows(table_ND, state, idx_R, grad_RD, learning_rate, b1, b2, eps,
                                 weight_decay)
  return table_ND.at[idx_R].set(new_RD.astype(table_ND.dtype), mode="drop"), new_state


def _adam_rows(table_ND, state, idx_R, grad_RD, learning_rate, b1, b2, eps, weight_decay):
  """(new rows float32 [R, D], new state) of `row_adam_step`."""
  step = state.step + 1
  lr = jnp.asarray(learning_rate, jnp.float32)
  grad_RD = grad_RD.astype(jnp.float32)
  count_R = state.count_N.at[idx_R].get(mode="fill", fill_value=0) + 1
  mu_RD = b1 * state.mu_ND.at[idx_R].get(mode="fill", fill_value=0) + (1 - b1) * grad_RD
  nu_RD = b2 * state.nu_ND.at[idx_R].get(mode="fill", fill_value=0) + (1 - b2) * grad_RD**2
  count_f = count_R.astype(jnp.float32)[:, None]
  direction_RD = (mu_RD / (1 - b1**count_f)) / (jnp.sqrt(nu_RD / (1 - b2**count_f)) + eps)
  rows_RD = table_ND.at[idx_R].get(mode="fill", fill_value=0)
  last_R = state.last_step_N.at[idx_R].get(mode="fill", fill_value=0)
  new_RD = _decayed(rows_RD, last_R, step, lr, weight_decay) - lr * direction_RD
  new_state = RowAdamState(
      step,
      state.count_N.at[idx_R].set(count_R, mode="drop"),
      state.last_step_N.at[idx_R].set(_after(last_R, step), mode="drop"),
      state.mu_ND.at[idx_R].set(mu_RD, mode="drop"),
      state.nu_ND.at[idx_R].set(nu_RD, mode="drop"),
  )
  return new_RD, new_state


def row_adagrad_step(table_ND: jax.Array, state: RowAdagradState, idx_R: jax.Array,
                     grad_RD: jax.Array, learning_rate: jax.Array, eps: float = 1e-10,
                     weight_decay: float = 0.0) -> tuple[jax.Array, RowAdagradState]:
  """Lazy row-wise Adagrad on the rows `idx` (unique; entries equal to N are skipped).

  At step t, for each touched row n: s_n <- s_n + mean_d g_nd^2,
  V_n <- V_n (1 - lr wd)^(t - last_n) - lr g_n / (sqrt(s_n) + eps), last_n <- t. One
  accumulator per row (N floats of state, not N x D). O(R D).
  Duchi et al. 2011 (Adagrad); row-wise Adagrad of DLRM / FBGEMM embedding tables.
  """
  _check_table(table_ND)
  new_RD, new_state = _adagrad_rows(table_ND, state, idx_R, grad_RD, learning_rate, eps,
                                    weight_decay)
  return table_ND.at[idx_R].set(new_RD.astype(table_ND.dtype), mode="drop"), new_state


def _adagrad_rows(table_ND, state, idx_R, grad_RD, learning_rate, eps, weight_decay):
  """(new rows float32 [R, D], new state) of `row_adagrad_step`."""
  step = state.step + 1
  lr = jnp.asarray(learning_rate, jnp.float32)
  grad_RD = grad_RD.astype(jnp.float32)
  sum_sq_R = (state.sum_sq_N.at[idx_R].get(mode="fill", fill_value=0)
              + jnp.mean(grad_RD**2, axis=1))
  rows_RD = table_ND.at[idx_R].get(mode="fill", fill_value=0)
  last_R = state.last_step_N.at[idx_R].get(mode="fill", fill_value=0)
  new_RD = (_decayed(rows_RD, last_R, step, lr, weight_decay)
            - lr * grad_RD / (jnp.sqrt(sum_sq_R)[:, None] + eps))
  new_state = RowAdagradState(step, state.last_step_N.at[idx_R].set(_after(last_R, step),
                                                                  mode="drop"),
                              state.sum_sq_N.at[idx_R].set(sum_sq_R, mode="drop"))
  return new_RD, new_state


def _row_transform(init_leaf, rows_leaf, learning_rate: optax.ScalarOrSchedule,
                   capacity: int) -> optax.GradientTransformation:
  """An optax transformation updating the touched rows of every (N, D) leaf with `rows_leaf`."""
  _check_capacity(capacity)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("row-sparse optimizers need params (for the update and the lazy decay)")

    def leaf(grad, leaf_state, table_ND):
      lr = learning_rate(leaf_state.step) if callable(learning_rate) else learning_rate
      if is_rows(grad):
        idx_R, grad_RD = grad.idx_R[:capacity], grad.rows_RD[:capacity]
      else:
        idx_R = touched_rows(grad, capacity)
        grad_RD = grad.at[idx_R].get(mode="fill", fill_value=0)
      new_RD, new_state = rows_leaf(table_ND, leaf_state, idx_R, grad_RD, lr)
      delta_RD = new_RD - table_ND.at[idx_R].get(mode="fill", fill_value=0).astype(jnp.float32)
      delta_RD = jnp.where((idx_R < table_ND.shape[0])[:, None], delta_RD, 0.0)
      delta_RD = delta_RD.astype(table_ND.dtype)
      if is_rows(grad):
        return Rows(idx_R, delta_RD), new_state
      return jnp.zeros_like(table_ND).at[idx_R].set(delta_RD, mode="drop"), new_state

    pairs = jax.tree.map(leaf, updates, state, params, is_leaf=is_rows)
    return (jax.tree.map(lambda _, pair: pair[0], updates, pairs, is_leaf=is_rows),
            jax.tree.map(lambda _, pair: pair[1], updates, pairs, is_leaf=is_rows))

  return optax.GradientTransformation(lambda params: jax.tree.map(init_leaf, params), update_fn)


def tree_norm(tree) -> jax.Array:
  """optax.tree.norm, a `Rows` leaf counting its rows: sqrt(sum of squares), equal to the norm
  of the dense tree since a `Rows`' indices are unique."""
  return optax.tree.norm(jax.tree.map(lambda x: x.rows_RD if is_rows(x) else x, tree,
                                      is_leaf=is_rows))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm on trees holding `Rows`: g <- g min(1, max_norm / ||g||), with
  ||g|| = `tree_norm(g)` over all leaves; a `Rows` scales its rows."""

  def update_fn(updates, state, params=None):
    del params
    norm = tree_norm(updates)
    keep = norm < max_norm
    clip = lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(lambda x: Rows(x.idx_R, clip(x.rows_RD)) if is_rows(x) else clip(x),
                        updates, is_leaf=is_rows), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def apply_updates(params, updates):
  """optax.apply_updates, a `Rows` update added to its rows only: V.at[idx].add(rows), O(R D)
  (in place when params are donated), every other row left bit-identical."""

  def apply(param, update):
    if is_rows(update):
      return param.at[update.idx_R].add(update.rows_RD.astype(param.dtype), mode="drop")
    return optax.apply_updates(param, update)

  return jax.tree.map(apply, params, updates)


def row_adamw(learning_rate: optax.ScalarOrSchedule, capacity: int, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """Lazy row-wise AdamW (`row_adam_step`) for a tree of (N, D) value tables, as optax.

  Each step updates the rows of a `Rows` gradient (its first `capacity` rows), or else finds
  the rows with a non-zero dense gradient (`touched_rows`, at most `capacity` per table), and
  returns params' delta new - old on those rows: as `Rows` for a `Rows` gradient, else dense
  and exactly 0 elsewhere.
  The learning rate (or schedule, read at the step count before this step, as optax does) and
  the deferred decay follow the module docstring. Defaults are `optax.adamw`'s.
  """
  return _row_transform(
      init_row_adam,
      lambda t, s, i, g, lr: _adam_rows(t, s, i, g, lr, b1, b2, eps, weight_decay),
      learning_rate, capacity)


def row_adagrad(learning_rate: optax.ScalarOrSchedule, capacity: int, eps: float = 1e-10,
                weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Lazy row-wise Adagrad (`row_adagrad_step`) for a tree of (N, D) value tables, as optax."""
  return _row_transform(
      init_row_adagrad,
      lambda t, s, i, g, lr: _adagrad_rows(t, s, i, g, lr, eps, weight_decay),
      learning_rate, capacity)

