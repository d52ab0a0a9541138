"""Decode-time selection over a KV cache, against naive NumPy attention and hand-written plans."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.attention import decode

B, H, S, K, PAGE = 2, 3, 16, 4, 4


def _filled_cache(length: int, page_size: int = PAGE, seed: int = 0):
  """A one-layer cache with `length` tokens (extend of all but 3, then 3 appends) and the
  NumPy keys and values [B, H, length, K] it should hold."""
  rng = np.random.default_rng(seed)
  k, v = (rng.normal(size=(B, H, length, K)).astype(np.float32) for _ in range(2))
  cache = decode.init_cache(1, B, H, S, K, page_size=page_size)
  cache = decode.extend(cache, 0, jnp.asarray(k[:, :, :-3]), jnp.asarray(v[:, :, :-3]))
  for t in range(length - 3, length):
    cache = decode.append(cache, 0, jnp.asarray(k[:, :, t]), jnp.asarray(v[:, :, t]))
  return cache, k, v


def _query(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(B, H, K)).astype(np.float32)


def _numpy_attention(q, k, v, keep):
  """o[b, h] = softmax over the kept positions of q.k / sqrt(K), times v ([B, H, K])."""
  s = np.einsum("bhk,bhsk->bhs", q, k) / np.sqrt(K)
  s = np.where(keep, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhs,bhsk->bhk", w / w.sum(-1, keepdims=True), v)


def test_cache_holds_the_tokens_and_their_page_min_max():
  cache, k, v = _filled_cache(11)
  np.testing.assert_array_equal(cache.lengths_L, [11])
  np.testing.assert_array_equal(cache.k_LBHSK[0, :, :, :11], k)
  np.testing.assert_array_equal(cache.v_LBHSK[0, :, :, 11:], 0)
  for page in range(S // PAGE):
    rows = k[:, :, page * PAGE:min((page + 1) * PAGE, 11)]
    want_min = rows.min(2) if rows.shape[2] else np.zeros((B, H, K))
    want_max = rows.max(2) if rows.shape[2] else np.zeros((B, H, K))
    np.testing.assert_array_equal(cache.kmin_LBHMK[0, :, :, page], want_min)
    np.testing.assert_array_equal(cache.kmax_LBHMK[0, :, :, page], want_max)


def test_full_attention_over_the_filled_slots():
  cache, k, v = _filled_cache(11)
  q = _query()
  o, idx, attended = decode.attend(jnp.asarray(q), cache, 0)
  assert idx is None and float(attended) == 1.0
  np.testing.assert_allclose(o, _numpy_attention(q, k, v, np.ones(11, bool)), atol=1e-6)


@pytest.mark.parametrize("sink, recent", [(0, 0), (1, 2)])
def test_topk_keeps_each_heads_best_tokens_plus_sink_and_recent(sink, recent):
  cache, k, v = _filled_cache(11)
  q, budget = _query(), 5
  o, idx, attended = decode.attend(jnp.asarray(q), cache, 0, "topk", budget, sink=sink,
                                   recent=recent)
  s = np.einsum("bhk,bhsk->bhs", q, k)
  keep = np.zeros((B, H, 11), bool)
  keep[..., :sink] = True
  keep[..., 11 - recent:] = True
  for b in range(B):
    for h in range(H):
      rest = [j for j in np.argsort(-s[b, h]) if not keep[b, h, j]]
      keep[b, h, rest[:budget - sink - recent]] = True
      np.testing.assert_array_equal(idx[b, h], np.flatnonzero(keep[b, h]))
  np.testing.assert_allclose(o, _numpy_attention(q, k, v, keep), atol=1e-6)
  assert float(attended) == pytest.approx(budget / 11)


def test_shared_keeps_one_set_by_the_heads_summed_probabilities():
  cache, k, v = _filled_cache(11)
  q, budget = _query(), 4
  o, idx, attended = decode.attend(jnp.asarray(q), cache, 0, "shared", budget, recent=1)
  s = np.einsum("bhk,bhsk->bhs", q, k) / np.sqrt(K)
  p = np.exp(s - s.max(-1, keepdims=True))
  mass = (p / p.sum(-1, keepdims=True)).sum(1)  # [B, 11]
  keep = np.zeros((B, H, 11), bool)
  for b in range(B):
    ranked = [j for j in np.argsort(-mass[b]) if j != 10]
    keep[b, :, sorted(ranked[:budget - 1] + [10])] = True
    assert (idx[b] == idx[b, 0]).all()
  np.testing.assert_allclose(o, _numpy_attention(q, k, v, keep), atol=1e-6)
  assert float(attended) == pytest.approx(budget / 11)


@pytest.mark.parametrize("length, pages, sink, recent", [(11, 2, 0, 0), (15, 3, 1, 2)])
def test_pages_bound_the_page_scores_and_attend_exactly_inside_the_chosen_pages(
    length, pages, sink, recent):
  cache, k, v = _filled_cache(length)
  q = _query()
  o, idx, attended = decode.attend(jnp.asarray(q), cache, 0, "pages", pages * PAGE, sink=sink,
                                   recent=recent)
  num_pages = -(-length // PAGE)
  forced = [0, num_pages - 1] if sink else []  # the sink's page and the newest page
  keep = np.zeros((B, H, length), bool)
  for b in range(B):
    for h in range(H):
      bound = []
      for page in range(num_pages):
        rows = k[b, h, page * PAGE:(page + 1) * PAGE]
        bound.append(np.maximum(q[b, h] * rows.min(0), q[b, h] * rows.max(0)).sum())
        assert bound[-1] >= (rows @ q[b, h]).max() - 1e-6  # an upper bound
      rest = [page for page in np.argsort(-np.array(bound)) if page not in forced]
      chosen = np.sort(forced + rest[:pages - len(forced)])
      np.testing.assert_array_equal(idx[b, h], chosen)
      for page in chosen:
        keep[b, h, page * PAGE:(page + 1) * PAGE] = True
  np.testing.assert_allclose(o, _numpy_attention(q, k, v, keep), atol=1e-6)
  assert float(attended) == pytest.approx(keep.sum() / (B * H * length))


def test_reuse_attends_to_the_given_positions():
  cache, k, v = _filled_cache(11)
  q = _query(2)
  reuse = np.broadcast_to(np.array([0, 3, 9], np.int32), (B, H, 3))
  o, idx, _ = decode.attend(jnp.asarray(q), cache, 0, "topk", 3, jnp.asarray(reuse))
  np.testing.assert_array_equal(idx, reuse)
  keep = np.zeros(11, bool)
  keep[[0, 3, 9]] = True
  np.testing.assert_allclose(o, _numpy_attention(q, k, v, keep), atol=1e-6)


def test_budget_of_the_whole_context_equals_full_attention():
  cache, _, _ = _filled_cache(11)
  q = jnp.asarray(_query())
  full = decode.attend(q, cache, 0)[0]
  for selection in ("topk", "shared", "pages"):
    o, idx, attended = decode.attend(q, cache, 0, selection, S)  # budget = max_len: exact
    np.testing.assert_array_equal(o, full)
    assert idx is None and float(attended) == 1.0
    o, _, attended = decode.attend(q, cache, 0, selection, 12)  # >= the 11 filled tokens
    np.testing.assert_allclose(o, full, rtol=1e-6, atol=1e-6)
    assert float(attended) == 1.0


def test_selection_plans():
  assert decode.selection_plan(3, "full") == ("full",) * 3
  assert decode.selection_plan(3, "every_layer") == ("sparse",) * 3
  assert decode.selection_plan(6, "tidal", num_full=2, reselect=(4,)) == (
      "full", "full", "select", "reuse", "select", "reuse")
  assert decode.selection_plan(7, "delta", num_full=1, group_size=3) == (
      "full", "select", "reuse", "reuse", "select", "reuse", "reuse")
  with pytest.raises(ValueError, match=r"plan kind='nope'; allowed: full, every_layer"):
    decode.selection_plan(3, "nope")
  with pytest.raises(ValueError, match=r"reselect layers \[2\] must lie in \[3, 5\]"):
    decode.selection_plan(6, "tidal", num_full=2, reselect=(2,))
  with pytest.raises(ValueError, match=r"plan layer 1 reuses positions but no layer below"):
    decode.check_plan(("full", "reuse"), 2)


def test_bad_selections_are_clear_errors():
  cache, _, _ = _filled_cache(5, page_size=0)
  q = jnp.zeros((B, H, K))
  with pytest.raises(ValueError, match=r"selection='best'; allowed: full, topk, shared, pages"):
    decode.attend(q, cache, 0, "best", 4)
  with pytest.raises(ValueError, match=r"budget=None must be a positive int"):
    decode.attend(q, cache, 0, "topk")
  with pytest.raises(ValueError, match=r"sink=3 and recent=2 must be >= 0 with sink \+ recent"):
    decode.attend(q, cache, 0, "topk", 4, sink=3, recent=2)
  with pytest.raises(ValueError, match=r"needs a cache with page summaries"):
    decode.attend(q, cache, 0, "pages", 4)
  with pytest.raises(ValueError, match=r"budget=6 must be a multiple of the cache's page_size=4"):
    decode.attend(q, _filled_cache(5)[0], 0, "pages", 6)
  with pytest.raises(ValueError, match=r"sink=1 and recent=5 fill more than the budget's 2 pages"):
    decode.attend(q, _filled_cache(5)[0], 0, "pages", 8, sink=1, recent=5)
  with pytest.raises(ValueError, match=r"page_size=5 must be 0 \(no pages\) or a positive divisor"):
    decode.init_cache(1, 1, 1, 16, 4, page_size=5)


def test_append_is_jit_and_scan_friendly():
  cache = decode.init_cache(2, B, H, S, K, page_size=PAGE)
  k = jax.random.normal(jax.random.key(0), (6, B, H, K))

  def body(cache, k_BHK):
    return decode.append(decode.append(cache, 0, k_BHK, k_BHK), 1, -k_BHK, k_BHK), None

  cache, _ = jax.lax.scan(body, cache, k)
  np.testing.assert_array_equal(cache.lengths_L, [6, 6])
  np.testing.assert_array_equal(cache.k_LBHSK[1, :, :, :6], -np.moveaxis(np.asarray(k), 0, 2))
  np.testing.assert_array_equal(cache.kmax_LBHMK[0, :, :, 1], np.asarray(k)[4:6].max(0))


def test_appending_past_a_full_cache_keeps_the_last_pages_summary_a_bound():
  """S + 2 appends: the last slot is overwritten, and the last page's min / max must still
  bound every key left in that page (Quest's upper bound relies on it)."""
  cache = decode.init_cache(1, B, H, S, K, page_size=PAGE)
  k = jax.random.normal(jax.random.key(3), (S + 2, B, H, K))
  cache, _ = jax.lax.scan(lambda c, k_BHK: (decode.append(c, 0, k_BHK, k_BHK), None), cache, k)
  last_page = np.asarray(cache.k_LBHSK[0, :, :, S - PAGE:])
  np.testing.assert_array_equal(last_page[:, :, -1], k[-1])
  assert (np.asarray(cache.kmin_LBHMK[0, :, :, -1]) <= last_page.min(2)).all()
  assert (np.asarray(cache.kmax_LBHMK[0, :, :, -1]) >= last_page.max(2)).all()
