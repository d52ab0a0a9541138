"""Attention patterns against masks built with plain loops from each paper's definition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.attention import patterns as P


def loop_mask(allowed, seq_len: int) -> np.ndarray:
  """[L, L] bool with mask[i, j] = allowed(i, j), by explicit loops."""
  return np.array([[bool(allowed(i, j)) for j in range(seq_len)] for i in range(seq_len)])


def loop_block_kinds(mask_TT: np.ndarray, block: int) -> np.ndarray:
  """EMPTY / PARTIAL / FULL per block of a [L, L] mask, looping over the blocks' existing pairs."""
  seq_len = mask_TT.shape[0]
  num_blocks = -(-seq_len // block)
  kinds = np.zeros((num_blocks, num_blocks), np.int8)
  for r in range(num_blocks):
    for c in range(num_blocks):
      part = mask_TT[r * block:(r + 1) * block, c * block:(c + 1) * block]
      kinds[r, c] = P.FULL if part.all() else (P.EMPTY if not part.any() else P.PARTIAL)
  return kinds


def child_strided(i, j, stride):
  """Child et al. 2019 sec. 4.3: A_i = {t, ..., i}, t = max(0, i - l), U {j : (i - j) mod l = 0}."""
  return max(0, i - stride) <= j <= i or (j <= i and (i - j) % stride == 0)


def child_fixed(i, j, stride, summary):
  """Child et al. 2019: A^(1) = {j : floor(j/l) = floor(i/l)}, A^(2) = {j : j mod l in {t..l}},
  t = l - c, autoregressive (j <= i)."""
  return j <= i and (j // stride == i // stride or j % stride >= stride - summary)


SHARED_CASES = [
    ("causal", P.causal(), lambda i, j: j <= i),
    ("window5", P.sliding_window(5), lambda i, j: abs(i - j) < 5),
    ("chunked6", P.chunked(6), lambda i, j: i // 6 == j // 6),
    ("global3", P.global_tokens(3), lambda i, j: i < 3 or j < 3),
    ("causal_strided4", P.causal() & P.strided(4), lambda i, j: child_strided(i, j, 4)),
    ("strided3", P.strided(3), lambda i, j: abs(i - j) < 3 or (i - j) % 3 == 0),
    ("causal_fixed5_2", P.causal() & P.fixed(5, 2), lambda i, j: child_fixed(i, j, 5, 2)),
    ("causal_window_or_global", P.causal() & (P.sliding_window(4) | P.global_tokens(2)),
     lambda i, j: j <= i and (i - j < 4 or j < 2)),
]


@pytest.mark.parametrize("name,pattern,allowed", SHARED_CASES, ids=[c[0] for c in SHARED_CASES])
@pytest.mark.parametrize("seq_len,block", [(29, 4), (32, 8), (13, 16)])
def test_shared_patterns_dense_and_block_masks(name, pattern, allowed, seq_len, block):
  del name
  expected_TT = loop_mask(allowed, seq_len)
  np.testing.assert_array_equal(P.dense_mask(pattern, seq_len), expected_TT)
  kinds = loop_block_kinds(expected_TT, block)
  visible, full = P.block_mask(pattern, seq_len, block)
  np.testing.assert_array_equal(visible, kinds != P.EMPTY)
  np.testing.assert_array_equal(full, kinds == P.FULL)


PRIMITIVES = [P.causal(), P.sliding_window(1), P.sliding_window(6), P.chunked(3), P.chunked(8),
              P.global_tokens(5), P.global_tokens(9), P._every_stride(3),
              P._summary_columns(5, 2)]


@pytest.mark.parametrize("pattern", PRIMITIVES, ids=repr)
@pytest.mark.parametrize("seq_len,block", [(29, 4), (32, 8), (30, 3)])
def test_primitive_block_kinds_are_exact_without_visiting_tokens(pattern, seq_len, block):
  """Each constructor states the exact kind of every block from its definition alone."""
  expected = loop_block_kinds(P.dense_mask(pattern, seq_len), block)
  np.testing.assert_array_equal(pattern.block_kinds(seq_len, block), expected)


def test_composition_kinds_are_conservative_and_layout_settles_them():
  # Block (0, 0) of 2 x 2: causal misses (0, 1), global_tokens(1) misses (1, 1); together full.
  pattern = P.causal() | P.global_tokens(1)
  assert pattern.block_kinds(4, 2)[0, 0] == P.PARTIAL
  assert P.block_layout(pattern, 4, 2).kinds[0, 0] == P.FULL
  np.testing.assert_array_equal(P.block_mask(pattern, 4, 2).full, [[True, False], [True, False]])


def test_per_head_spans_follow_moa_definition():
  spans = (1, 3, 6)
  pattern = P.causal() & P.per_head_spans(spans)
  expected = np.stack([loop_mask(lambda i, j, s=s: 0 <= i - j < s, 20) for s in spans])
  np.testing.assert_array_equal(P.dense_mask(pattern, 20), expected)
  visible, full = P.block_mask(pattern, 20, 4)
  for head in range(3):
    kinds = loop_block_kinds(expected[head], 4)
    np.testing.assert_array_equal(visible[head], kinds != P.EMPTY)
    np.testing.assert_array_equal(full[head], kinds == P.FULL)


def test_per_head_composes_with_shared_and_rejects_other_head_counts():
  two = P.per_head([P.causal(), P.global_tokens(2)])
  mixed = two | P.sliding_window(2)
  expected = np.stack([loop_mask(lambda i, j: j <= i or abs(i - j) < 2, 9),
                       loop_mask(lambda i, j: i < 2 or j < 2 or abs(i - j) < 2, 9)])
  np.testing.assert_array_equal(P.dense_mask(mixed, 9), expected)
  with pytest.raises(ValueError, match=r"leading head shapes must match"):
    _ = two & P.per_head_spans((1, 2, 3))


def test_block_table_pattern_is_its_mask_at_token_level():
  mask_RC = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], bool)
  expected = loop_mask(lambda i, j: mask_RC[i // 4, j // 4], 11)
  pattern = P.blocks(mask_RC, 4)
  np.testing.assert_array_equal(P.dense_mask(pattern, 11), expected)
  np.testing.assert_array_equal(pattern.block_kinds(11, 4), np.where(mask_RC, P.FULL, P.EMPTY))
  np.testing.assert_array_equal(pattern.block_kinds(11, 2), np.full((6, 6), P.PARTIAL))
  visible, full = P.block_mask(pattern, 11, 2)
  kinds = loop_block_kinds(expected, 2)
  np.testing.assert_array_equal(visible, kinds != P.EMPTY)
  np.testing.assert_array_equal(full, kinds == P.FULL)


def test_random_blocks_draw_earlier_blocks_per_query_block():
  pattern = P.random_blocks(2, block=4, seed=3)
  dense = P.dense_mask(pattern, 40)
  table = dense[::4, ::4]
  # token level: whole blocks, constant inside
  np.testing.assert_array_equal(dense, np.kron(table, np.ones((4, 4), bool)))
  for r in range(10):
    assert table[r].sum() == min(2, r + 1)
    assert not table[r, r + 1:].any()
  # row r's draw does not depend on L; another seed draws another table
  np.testing.assert_array_equal(P.dense_mask(pattern, 24), dense[:24, :24])
  assert (P.dense_mask(P.random_blocks(2, 4, seed=4), 40) != dense).any()
  heads = P.dense_mask(P.random_blocks(1, 4, seed=3, num_heads=3), 40)
  assert heads.shape == (3, 40, 40) and (heads[0] != heads[1]).any()


def test_bigbird_is_global_window_and_random_blocks():
  pattern = P.causal() & P.bigbird(window=3, num_global=2, num_random=1, block=4, seed=0)
  random_TT = P.dense_mask(P.random_blocks(1, 4, seed=0), 23)
  expected = loop_mask(lambda i, j: j <= i and (i < 2 or j < 2 or i - j < 3 or random_TT[i, j]),
                       23)
  np.testing.assert_array_equal(P.dense_mask(pattern, 23), expected)
  visible, full = P.block_mask(pattern, 23, 4)
  kinds = loop_block_kinds(expected, 4)
  np.testing.assert_array_equal(visible, kinds != P.EMPTY)
  np.testing.assert_array_equal(full, kinds == P.FULL)


def test_block_layout_tiles_are_the_masks_of_the_stored_blocks():
  pattern = P.causal() & P.per_head([P.strided(3), P.sliding_window(5) | P.global_tokens(2)])
  seq_len, block = 22, 4
  layout = P.block_layout(pattern, seq_len, block)
  dense = P.dense_mask(pattern, seq_len)
  padded = np.pad(dense, [(0, 0), (0, 2), (0, 2)])
  assert layout.tiles[0].all()
  assert len({t.tobytes() for t in layout.tiles}) == len(layout.tiles)  # distinct
  for h, r, c in np.ndindex(layout.tile.shape):
    part = padded[h, r * block:(r + 1) * block, c * block:(c + 1) * block]
    if layout.tile[h, r, c] < 0:
      assert not part.any()
    else:
      np.testing.assert_array_equal(layout.tiles[layout.tile[h, r, c]], part)


def loop_topk_table(q_BHTK, k_BHTK, block, k):
  """Pooled means, scores, then per query block: itself plus the best k - 1 earlier blocks."""
  q_BHTK, k_BHTK = np.asarray(q_BHTK, np.float64), np.asarray(k_BHTK, np.float64)
  batch, heads, length, _ = q_BHTK.shape
  num_blocks = -(-length // block)
  table = np.zeros((batch, heads, num_blocks, num_blocks), bool)
  for b in range(batch):
    for h in range(heads):
      qm = [q_BHTK[b, h, r * block:(r + 1) * block].mean(0) for r in range(num_blocks)]
      km = [k_BHTK[b, h, c * block:(c + 1) * block].mean(0) for c in range(num_blocks)]
      for r in range(num_blocks):
        earlier = sorted(range(r), key=lambda c: -float(qm[r] @ km[c]))
        for c in [r] + earlier[:k - 1]:
          table[b, h, r, c] = True
  return table


def test_topk_blocks_pick_pooled_best_earlier_blocks_eager_and_jitted():
  key_q, key_k = jax.random.split(jax.random.PRNGKey(0))
  q_BHTK = jax.random.normal(key_q, (2, 3, 22, 4))
  k_BHTK = jax.random.normal(key_k, (2, 3, 22, 4))
  table = loop_topk_table(q_BHTK, k_BHTK, block=4, k=3)
  expected = np.kron(table, np.ones((4, 4), bool))[..., :22, :22]
  pattern = P.topk_blocks(q_BHTK, k_BHTK, 4, 3)
  assert pattern.lead_shape == (2, 3)
  np.testing.assert_array_equal(P.dense_mask(pattern, 22), expected)
  jitted = jax.jit(lambda q, k: P.dense_mask(P.causal() & P.topk_blocks(q, k, 4, 3), 22))
  np.testing.assert_array_equal(jitted(q_BHTK, k_BHTK), expected & np.tri(22, dtype=bool))
  visible, full = P.block_mask(pattern, 22, 4)
  np.testing.assert_array_equal(visible, table)
  np.testing.assert_array_equal(full, table)


def test_traced_pattern_has_no_host_layout():
  def layout_in_jit(q_BHTK):
    P.block_layout(P.topk_blocks(q_BHTK, q_BHTK, 4, 2), 8, 4)
    return q_BHTK

  with pytest.raises(ValueError, match=r"is traced .* call outside jit, or use dense_mask"):
    jax.jit(layout_in_jit)(jnp.ones((1, 1, 8, 2)))


@pytest.mark.parametrize("make,message", [
    (lambda: P.sliding_window(0), r"window=0 must be a positive int"),
    (lambda: P.fixed(4, 5), r"summary=5 must be at most stride=4"),
    (lambda: P.per_head([]), r"per_head needs a non-empty list"),
    (lambda: P.blocks(np.ones((3,), bool), 2), r"block mask must be a bool array"),
    (lambda: P.block_mask(P.causal(), 10, 0), r"block=0 must be a positive int"),
])
def test_bad_arguments_are_one_line_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()
