"""Block-sparse attention against dense masked attention: NumPy float64 outputs, autodiff grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse_attention as bsa
from tests.kernels.checks import assert_close


def loop_mask(heads: int, seq_len: int, block: int, seed: int) -> np.ndarray:
  """[H, T, T]: causal, and per head a random subset of the blocks below the diagonal (some
  block rows keep none) plus a window of 2 + h keys inside the rest, by explicit loops."""
  rng = np.random.default_rng(seed)
  num_blocks = -(-seq_len // block)
  kept = rng.random((heads, num_blocks, num_blocks)) < 0.4
  mask = np.zeros((heads, seq_len, seq_len), bool)
  for h in range(heads):
    for i in range(seq_len):
      for j in range(i + 1):
        mask[h, i, j] = kept[h, i // block, j // block] or i - j < 2 + h
  return mask


def numpy_attention(q, k, v, mask, scale):
  """softmax over the allowed keys of scale q k^T, times v, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bhtk,bhsk->bhts", q, k) * scale
  scores = np.where(mask, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhts,bhsk->bhtk", weights / weights.sum(-1, keepdims=True), v)


def jnp_attention(q, k, v, mask, scale):
  """The same dense masked attention in jnp, for JAX's own gradients."""
  scores = jnp.einsum("bhtk,bhsk->bhts", q, k, precision="highest") * scale
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bhsk->bhtk", probs, v, precision="highest")


def inputs(batch, heads, seq_len, dim, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return [jax.random.normal(key, (batch, heads, seq_len, dim)) for key in keys]


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("seq_len,block", [(37, 8), (32, 8), (9, 16)])
def test_outputs_and_gradients_match_dense_masked_attention(implementation, seq_len, block):
  """Ragged lengths (padded and masked), per-head masks, empty blocks, partial blocks."""
  mask = loop_mask(3, seq_len, block, seed=seq_len)
  schedule = bsa.schedule_from_mask(mask, block)
  q, k, v, cotangent = inputs(2, 3, seq_len, 8)
  scale = 0.3

  @jax.jit
  def attention_and_grads(q, k, v):
    out, vjp = jax.vjp(lambda *a: bsa.block_sparse_attention(
        *a, schedule, scale=scale, implementation=implementation), q, k, v)
    return out, vjp(cotangent)

  out, grads = attention_and_grads(q, k, v)
  assert_close(out, numpy_attention(q, k, v, mask, scale))
  _, vjp = jax.vjp(lambda *a: jnp_attention(*a, mask, scale), q, k, v)
  for name, grad, want in zip("qkv", grads, vjp(cotangent)):
    assert_close(grad, want, f"d{name}")


def test_schedule_stores_only_blocks_with_an_allowed_pair_and_densifies_back():
  mask = loop_mask(2, 37, 8, seed=1)
  schedule = bsa.schedule_from_mask(mask, 8)
  np.testing.assert_array_equal(bsa.densify_schedule(schedule), mask)
  padded = np.pad(mask, [(0, 0), (0, 3), (0, 3)]).reshape(2, 5, 8, 5, 8).any((2, 4))
  assert schedule.blocks.num_blocks == padded.sum() < 2 * 5 * 5  # empty blocks are skipped
  assert schedule.density == pytest.approx(padded.mean())


def test_jitted_with_the_schedule_as_an_argument():
  mask = loop_mask(2, 20, 4, seed=2)
  schedule = bsa.schedule_from_mask(mask, 4)
  q, k, v, _ = inputs(1, 2, 20, 4)
  out = jax.jit(lambda q, k, v, s: bsa.block_sparse_attention(q, k, v, s))(q, k, v, schedule)
  assert_close(out, numpy_attention(q, k, v, mask, 0.5))


def test_bfloat16_inputs_compute_in_float32():
  mask = loop_mask(1, 24, 8, seed=3)
  q, k, v, _ = (x.astype(jnp.bfloat16) for x in inputs(1, 1, 24, 8))
  schedule = bsa.schedule_from_mask(mask, 8)
  out = jax.jit(lambda q, k, v: bsa.block_sparse_attention(q, k, v, schedule))(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert_close(out, numpy_attention(q, k, v, mask, 8 ** -0.5))


def test_a_query_that_sees_no_key_is_an_error_naming_it():
  mask = np.tril(np.ones((2, 12, 12), bool))
  mask[1, 5] = False
  with pytest.raises(ValueError, match=r"query position 5 of head 1 sees no key \(1 blind"):
    bsa.schedule_from_mask(mask, 4)


def test_bad_arguments_are_one_line_errors():
  schedule = bsa.schedule_from_mask(np.tril(np.ones((2, 12, 12), bool)), 4)
  q = jnp.zeros((1, 2, 12, 4))
  with pytest.raises(ValueError, match=r"implementation='fast' is not one of 'auto', 'pallas'"):
    bsa.block_sparse_attention(q, q, q, schedule, implementation="fast")
  with pytest.raises(ValueError, match=r"k must be \[B, H=2, T=12, K\]"):
    bsa.block_sparse_attention(q, jnp.zeros((1, 3, 12, 4)), q, schedule)
  with pytest.raises(ValueError, match=r"tiles\[0\] must be all True"):
    bsa.build_attention_schedule(np.zeros((1, 3, 3), int), np.zeros((1, 4, 4), bool), 12)
  with pytest.raises(ValueError, match=r"tile must be \[H, 3, 3\] for seq_len=12"):
    bsa.build_attention_schedule(np.zeros((1, 2, 3), int), np.ones((1, 4, 4), bool), 12)


def test_a_tile_that_lets_a_query_see_padded_keys_is_an_error():
  """T = 12, b = 8: key block 1 holds 4 padded keys. Tile 0 (all True) there would count them in
  the softmax; a tile masking them is accepted (padded queries may see keys) and is exact."""
  full_tiles = np.ones((1, 8, 8), bool)
  with pytest.raises(ValueError, match=r"the tile of head 0, query block 0, key block 1 lets "
                                       r"queries see padded keys >= seq_len=12"):
    bsa.build_attention_schedule(np.zeros((1, 2, 2), int), full_tiles, 12)
  masked = np.ones((1, 8, 8), bool)
  masked[:, :, 4:] = False
  schedule = bsa.build_attention_schedule(np.array([[[0, 1], [0, 1]]]),
                                          np.concatenate([full_tiles, masked]), 12)
  q, k, v, _ = inputs(1, 1, 12, 4)
  out = jax.jit(lambda q, k, v: bsa.block_sparse_attention(q, k, v, schedule, scale=0.5,
                                                          implementation="xla"))(q, k, v)
  assert_close(out, numpy_attention(q, k, v, np.ones((1, 12, 12), bool), 0.5))
