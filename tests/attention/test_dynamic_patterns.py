"""AdaSpa-style per-head pattern search and SparseD-style reuse against a NumPy brute force:
block masses from dense float64 attention, blocks sorted by mass, cumulative sums."""
import jax
import numpy as np
import pytest

from kernels.block_sparse_attention import block_sparse_attention, build_attention_schedule
from sparsejax.attention.dynamic import (
    block_attention_mass,
    cached_head_patterns,
    head_layout,
    init_pattern_cache,
    search_head_patterns,
)

B, H, T, K, BLOCK = 2, 3, 22, 4, 4  # R = 6 blocks, the last one ragged (2 positions)
R = -(-T // BLOCK)


def _qk(seed, sharpness=(4.0, 1.0, 0.0)):
  """q, k [B, H, T, K]; head h's queries scaled by sharpness[h] (0: uniform attention); head 0's
  keys are its queries, so it attends mostly to itself (its diagonal blocks)."""
  rng = np.random.default_rng(seed)
  q, k = (rng.normal(size=(B, H, T, K)).astype(np.float32) for _ in range(2))
  k[:, 0] = q[:, 0]
  return q * np.asarray(sharpness, np.float32)[None, :, None, None], k


def _np_exact_mass(q, k):
  scores = np.einsum("bhtk,bhsk->bhts", q.astype(np.float64), k) / np.sqrt(K)
  scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  mass = np.zeros((H, R, R))
  for h, r, c in np.ndindex(H, R, R):
    rows, cols = slice(r * BLOCK, (r + 1) * BLOCK), slice(c * BLOCK, (c + 1) * BLOCK)
    mass[h, r, c] = probs[:, h, rows, cols].sum(-1).mean()
  return mass


def _np_pooled_mass(q, k):
  mass = np.zeros((B, H, R, R))
  for b, h, r in np.ndindex(B, H, R):
    q_r = q[b, h, r * BLOCK:(r + 1) * BLOCK].astype(np.float64).mean(0)
    logits = np.array([q_r @ k[b, h, c * BLOCK:(c + 1) * BLOCK].mean(0) / np.sqrt(K)
                       + np.log(len(k[b, h, c * BLOCK:(c + 1) * BLOCK])) for c in range(r + 1)])
    mass[b, h, r, :r + 1] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  return mass.mean(0)


def _np_search(mass, recall):
  """Brute force: per head, rows ranked diagonal first then by mass; the smallest k whose mean
  cumulative row mass reaches `recall`; the mask of each row's first k."""
  masks, keeps = np.zeros((H, R, R), bool), []
  for h in range(H):
    orders = []
    cumulative = np.zeros((R, R))
    for r in range(R):
      others = sorted(range(r), key=lambda c: -mass[h, r, c])
      orders.append([r] + others)
      sums = np.cumsum(mass[h, r, orders[-1]])
      cumulative[r] = np.concatenate([sums, np.full(R - r - 1, sums[-1])])
    keep = next(j + 1 for j in range(R) if cumulative[:, j].mean() >= min(recall, 1 - 1e-5))
    keeps.append(keep)
    for r in range(R):
      masks[h, r, orders[r][:keep]] = True
  return masks, np.array(keeps)


@pytest.mark.parametrize("method", ["exact", "pooled"])
def test_search_matches_numpy_brute_force(method):
  q, k = _qk(0)
  mass = (_np_exact_mass if method == "exact" else _np_pooled_mass)(q, k)
  recalls = (0.5, 0.9, 1.0)
  got_mass, searched = jax.jit(lambda q, k: (
      block_attention_mass(q, k, BLOCK, method),
      [search_head_patterns(q, k, BLOCK, recall, method) for recall in recalls]))(q, k)
  np.testing.assert_allclose(got_mass, mass, rtol=1e-5, atol=1e-6)
  for recall, got in zip(recalls, searched):
    want_mask, want_keep = _np_search(mass, recall)
    np.testing.assert_array_equal(got.keep_H, want_keep)
    np.testing.assert_array_equal(got.mask_HRC, want_mask)
    assert (np.asarray(got.recall_H) >= recall - 1e-5).all()
  if method == "exact":  # the sharp head needs fewer blocks than the uniform one
    keep = _np_search(mass, 0.9)[1]
    assert keep[0] < keep[2]


def test_head_layout_runs_block_sparse_attention_as_dense_masked():
  q, k = _qk(1)
  v = np.random.default_rng(2).normal(size=(B, H, T, K)).astype(np.float32)
  search = jax.jit(search_head_patterns, static_argnums=(2, 3))
  mask_HRC = np.asarray(search(q, k, BLOCK, 0.8).mask_HRC)
  layout = head_layout(mask_HRC, T, BLOCK)
  schedule = build_attention_schedule(layout.tile, layout.tiles, T)
  o = jax.jit(block_sparse_attention, static_argnames="implementation")(
      q, k, v, schedule, implementation="reference")
  token_mask = np.repeat(np.repeat(mask_HRC, BLOCK, 1), BLOCK, 2)[:, :T, :T]
  token_mask &= np.tril(np.ones((T, T), bool))
  scores = np.einsum("bhtk,bhsk->bhts", q.astype(np.float64), k) / np.sqrt(K)
  scores = np.where(token_mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(o, np.einsum("bhts,bhsk->bhtk", probs, v), rtol=1e-4, atol=1e-5)


def test_cache_is_dense_before_start_then_searched_and_reused():
  refresh_every, start_step, recall = 2, 1, 0.7
  causal = np.broadcast_to(np.tril(np.ones((R, R), bool)), (H, R, R))
  step_fn = jax.jit(lambda cache, q, k, step: cached_head_patterns(
      cache, q, k, step, block=BLOCK, recall=recall, refresh_every=refresh_every,
      start_step=start_step))
  cache = init_pattern_cache(H, R)
  want_searched_at = {0: None, 1: 1, 2: 1, 3: 3, 4: 3, 5: 5}
  inputs = {step: _qk(10 + step, sharpness=(3.0, 2.0, 1.0)) for step in want_searched_at}
  for step, searched_at in want_searched_at.items():
    cache, mask = step_fn(cache, *inputs[step], step)
    if searched_at is None:
      np.testing.assert_array_equal(mask, causal)
      assert int(cache.step) == -1
    else:
      want_mask, _ = _np_search(_np_exact_mass(*inputs[searched_at]), recall)
      np.testing.assert_array_equal(mask, want_mask)
      assert int(cache.step) == searched_at
  once_fn = jax.jit(lambda cache, q, k, step: cached_head_patterns(
      cache, q, k, step, block=BLOCK, recall=recall))
  once = init_pattern_cache(H, R)
  for step in range(3):
    once, mask = once_fn(once, *inputs[step], step)
  np.testing.assert_array_equal(mask, _np_search(_np_exact_mass(*inputs[0]), recall)[0])
  with pytest.raises(ValueError, match="recall=0"):
    search_head_patterns(*inputs[0], BLOCK, 0.0)
