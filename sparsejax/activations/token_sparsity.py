"""Spatial / token activation sparsity: run a block only on the top-scored tokens or windows.

The spatially sparse inference pattern: scores -> the indices of the `keep` best rows -> gather
them into a dense [B, keep, ...] batch -> run the block on it -> scatter the results back, the
other rows passing through unchanged (the block is a residual branch: kept rows get x + f(x)).
`keep` is static, so every shape is. Selection looks at all rows of a sequence, so these
functions suit encoders and vision models, not causal LMs.
Chen et al. 2023, "SparseViT: Revisiting Activation Sparsity for Efficient High-Resolution Vision
Transformer" (windows ranked by their activation norm); Ren et al. 2018, "SBNet: Sparse Blocks
Network for Fast Inference" (mask -> indices -> gather -> dense compute -> scatter).

Shape letters beyond the DESIGN legend: N rows (tokens or windows), K kept rows, P positions in
a window (w^2), C channels; x_BHWC is a feature map of height H and width W.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux, merge_aux


def keep_count(keep_fraction: float, num_rows: int) -> int:
  """max(1, round(keep_fraction N)) for a fraction in (0, 1]."""
  if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not (
      0 < keep_fraction <= 1):
    raise ValueError(f"keep_fraction={keep_fraction!r}; allowed: a fraction in (0, 1]")
  return max(1, round(keep_fraction * num_rows))


def select_top(x_BN: jax.Array, scores_BN: jax.Array, keep: int) -> tuple[jax.Array, jax.Array]:
  """(x_BK, idx_BK): the `keep` rows of largest score per batch element, in ascending row order.

  x_BN is [B, N, ...] (trailing dims are carried along); idx_BK holds the kept row indices
  sorted ascending, so an order-sensitive block sees its rows in their original order. Ties go
  to the lower index. No gradient reaches `scores`.
  """
  if scores_BN.shape != x_BN.shape[:2]:
    raise ValueError(f"scores_BN shape {scores_BN.shape} must be x's leading [B, N] = "
                     f"{x_BN.shape[:2]}")
  if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= x_BN.shape[1]:
    raise ValueError(f"keep={keep!r}; allowed: an int in [1, {x_BN.shape[1]}] (the rows)")
  _, idx_BK = jax.lax.top_k(jax.lax.stop_gradient(scores_BN), keep)
  idx_BK = jnp.sort(idx_BK, axis=1)
  return jnp.take_along_axis(x_BN, _expand(idx_BK, x_BN.ndim), axis=1), idx_BK


def scatter_rows(x_BN: jax.Array, idx_BK: jax.Array, y_BK: jax.Array) -> jax.Array:
  """x with row idx[b, k] of batch element b replaced by y[b, k]; the other rows unchanged."""
  batch_B1 = jnp.arange(x_BN.shape[0])[:, None]
  return x_BN.at[batch_B1, idx_BK].set(y_BK.astype(x_BN.dtype))


def token_sparse_apply(fn: Callable[[jax.Array], jax.Array], x_BTD: jax.Array,
                       scores_BT: jax.Array, keep_fraction: float) -> jax.Array:
  """y = x, except y_t = x_t + fn(x_S)_t on the K = round(keep_fraction T) top-scored tokens S.

  fn maps the gathered [B, K, D] tokens to a [B, K, D] residual update (it may mix the kept
  tokens, e.g. attention among them). With keep_fraction = 1, y = x + fn(x). Gradients flow to
  x and fn's params as in the masked form x + 1_S * fn(x) for a token-wise fn.
  Chen et al. 2023, "SparseViT"; Ren et al. 2018, "SBNet".
  """
  x_BKD, idx_BK = select_top(x_BTD, scores_BT, keep_count(keep_fraction, x_BTD.shape[1]))
  return scatter_rows(x_BTD, idx_BK, x_BKD + fn(x_BKD))


def window_partition(x_BHWC: jax.Array, window: int) -> jax.Array:
  """x_BNPC: the feature map cut into N = (H / w)(W / w) windows of P = w^2 positions each.

  Windows in row-major order of the window grid, positions row-major inside a window.
  """
  batch, height, width, channels = _check_map(x_BHWC, window)
  x_BhwwC = x_BHWC.reshape(batch, height // window, window, width // window, window, channels)
  return x_BhwwC.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def window_merge(x_BNPC: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """The inverse of `window_partition`: windows back into a [B, H, W, C] map."""
  batch, _, _, channels = x_BNPC.shape
  x_BhwwC = x_BNPC.reshape(batch, height // window, width // window, window, window, channels)
  return x_BhwwC.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def window_scores(x_BHWC: jax.Array, window: int) -> jax.Array:
  """scores_BN = mean over a window's positions of ||x_p||_2: SparseViT's window importance."""
  norms_BNP = jnp.linalg.norm(window_partition(x_BHWC, window).astype(jnp.float32), axis=-1)
  return jnp.mean(norms_BNP, axis=-1)


def select_windows(x_BHWC: jax.Array, window: int, keep: int,
                   scores_BN: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(windows_BKPC, idx_BK): the `keep` windows of largest score (default `window_scores`).

  Chen et al. 2023, "SparseViT" (window activation pruning by L2 norm).
  """
  if scores_BN is None:
    scores_BN = window_scores(x_BHWC, window)
  return select_top(window_partition(x_BHWC, window), scores_BN, keep)


def window_sparse_apply(fn: Callable[[jax.Array], jax.Array], x_BHWC: jax.Array, window: int,
                        keep_fraction: float, scores_BN: jax.Array | None = None) -> jax.Array:
  """y = x, except on the top-scored windows S: y_S = x_S + fn(x_S) (fn on [B, K, P, C]).

  K = round(keep_fraction N) windows of w x w positions, scored by `window_scores` unless
  `scores_BN` is given; fn sees each kept window as a dense block (e.g. window attention).
  Chen et al. 2023, "SparseViT".
  """
  batch, height, width, _ = _check_map(x_BHWC, window)
  num_windows = (height // window) * (width // window)
  windows_BKPC, idx_BK = select_windows(
      x_BHWC, window, keep_count(keep_fraction, num_windows), scores_BN)
  windows_BNPC = scatter_rows(
      window_partition(x_BHWC, window), idx_BK, windows_BKPC + fn(windows_BKPC))
  return window_merge(windows_BNPC, window, height, width)


class TokenSparseBlock(nn.Module):
  """Runs `block` (a residual branch following the layer contract) on the top-scored tokens.

  y = token_sparse_apply(block, x, scores, keep_fraction) with scores = ||x_t||_2 unless the
  call passes `scores_BT`. `block(x_BKD, deterministic=...)` returns (update_BKD, aux); its aux
  comes back prefixed "block/". Metrics: "active_fraction" (K / T).
  Chen et al. 2023, "SparseViT".
  """

  block: nn.Module
  keep_fraction: float = 0.5

  @nn.compact
  def __call__(self, x_BTD: jax.Array, scores_BT: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    if scores_BT is None:
      scores_BT = jnp.linalg.norm(x_BTD.astype(jnp.float32), axis=-1)
    block_aux = []

    def run_block(x_BKD: jax.Array) -> jax.Array:
      update_BKD, aux = self.block(x_BKD, deterministic=deterministic)
      block_aux.append(aux)
      return update_BKD

    y_BTD = token_sparse_apply(run_block, x_BTD, scores_BT, self.keep_fraction)
    fraction = keep_count(self.keep_fraction, x_BTD.shape[1]) / x_BTD.shape[1]
    own = {"losses": {}, "metrics": {"active_fraction": jnp.asarray(fraction)}}
    return y_BTD, merge_aux("block", block_aux[0], own)


def _expand(idx_BK: jax.Array, ndim: int) -> jax.Array:
  """idx_BK with trailing unit dims, to index axis 1 of an ndim array with take_along_axis."""
  return idx_BK.reshape(*idx_BK.shape, *([1] * (ndim - 2)))


def _check_map(x_BHWC: jax.Array, window: int) -> tuple[Any, ...]:
  """x's (B, H, W, C), or a ValueError unless x is 4-D with H and W multiples of `window`."""
  if x_BHWC.ndim != 4:
    raise ValueError(f"x_BHWC must be [B, H, W, C]; got shape {x_BHWC.shape}")
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(f"window={window!r}; allowed: a positive int")
  _, height, width, _ = x_BHWC.shape
  if height % window or width % window:
    raise ValueError(f"feature map {height}x{width} is not a multiple of window={window}")
  return x_BHWC.shape
