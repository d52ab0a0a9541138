"""gather_decode against the dense decode S @ table, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.ops import gather_decode


def _dense_decode(table_ND, idx_TK, weights_TK):
  """The [T, N] matrix holding `weights` at `idx` (repeats add), times the table."""
  T = idx_TK.shape[0]
  s_TN = jnp.zeros((T, table_ND.shape[0])).at[jnp.arange(T)[:, None], idx_TK].add(weights_TK)
  return s_TN @ table_ND


def test_gather_decode_matches_dense_decode_with_repeated_indices():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  table_ND = jax.random.normal(keys[0], (11, 5))
  idx_TK = jax.random.randint(keys[1], (7, 3), 0, 11).at[0].set(jnp.array([4, 4, 2]))
  weights_TK = jax.random.normal(keys[2], (7, 3))
  np.testing.assert_allclose(gather_decode(table_ND, idx_TK, weights_TK),
                             _dense_decode(table_ND, idx_TK, weights_TK), rtol=1e-5, atol=1e-6)
  loss = lambda decode: lambda t, w: jnp.sum(jnp.sin(decode(t, idx_TK, w)))
  got = jax.jit(jax.grad(loss(gather_decode), (0, 1)))(table_ND, weights_TK)
  want = jax.grad(loss(_dense_decode), (0, 1))(table_ND, weights_TK)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
