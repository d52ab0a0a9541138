"""Monarch against its dense formulation P_2 diag(L) P_1 diag(R) built from permutation matrices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks import monarch


def _stride_perm(n, b):
  """Q_nn with (h Q)[l Q' + j] = h[j b + l]: position j b + l (block l, slot j) moves to l Q' + j."""
  q = n // b
  perm = np.zeros((n, n))
  for j in range(q):
    for l in range(b):
      perm[j * b + l, l * q + j] = 1
  return perm


def _block_diag(blocks_bXY, xp):
  """diag(blocks) [b X, b Y]: entry (k X + a, m Y + c) is blocks[k, a, c] if k == m else 0."""
  b, rows, cols = blocks_bXY.shape
  return xp.einsum("kac,km->kamc", blocks_bXY, np.eye(b)).reshape(b * rows, b * cols)


def _dense_by_hand(l_bQS, r_bPQ, xp=np):
  """W_IO = diag(r) P_1 diag(l) P_2 as matrices, row-vector convention (y = x W)."""
  b, _, q = r_bPQ.shape
  s = l_bQS.shape[2]
  p2 = np.zeros((b * s, b * s))
  for k in range(b):
    for c in range(s):
      p2[k * s + c, c * b + k] = 1
  return (_block_diag(r_bPQ, xp) @ _stride_perm(b * q, b) @ _block_diag(l_bQS, xp) @ p2)


def _blocks(rng, b, p, q, s):
  return (rng.normal(size=(b, q, s)).astype(np.float32),
          rng.normal(size=(b, p, q)).astype(np.float32))


@pytest.mark.parametrize("b,p,q,s", [(2, 2, 2, 2), (4, 4, 4, 4), (3, 2, 5, 4), (4, 3, 2, 1)])
def test_matmul_and_dense_equal_the_permutation_matrix_product(b, p, q, s):
  rng = np.random.default_rng(b * 100 + p * 10 + q)
  l_bQS, r_bPQ = _blocks(rng, b, p, q, s)
  want_IO = _dense_by_hand(l_bQS.astype(np.float64), r_bPQ.astype(np.float64))
  x = rng.normal(size=(2, 3, b * p)).astype(np.float32)
  np.testing.assert_allclose(monarch.monarch_matmul(x, l_bQS, r_bPQ), x @ want_IO,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(monarch.monarch_dense(l_bQS, r_bPQ), want_IO, rtol=1e-5, atol=1e-5)


def test_square_entries_are_single_products():
  b = 3
  l_bQS, r_bPQ = _blocks(np.random.default_rng(0), b, b, b, b)
  w_IO = np.asarray(monarch.monarch_dense(l_bQS, r_bPQ))
  for k in range(b):
    for a in range(b):
      for s in range(b):
        for c in range(b):
          assert w_IO[k * b + a, s * b + c] == pytest.approx(r_bPQ[k, a, c] * l_bQS[c, k, s],
                                                             rel=1e-5)


def test_many_small_blocks_give_the_stride_block_support():
  # b = 4 blocks of 1 x 2 then 2 x 1: input k reaches hidden 2k, 2k + 1, which go to second-stage
  # blocks 2k mod 4 and (2k + 1) mod 4, i.e. outputs {2k mod 4, (2k + 1) mod 4}.
  w_IO = np.asarray(monarch.monarch_dense(jnp.ones((4, 2, 1)), jnp.ones((4, 1, 2))))
  want = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]], float)
  np.testing.assert_array_equal(w_IO, want)


def test_gradients_equal_the_dense_formulation():
  rng = np.random.default_rng(1)
  l_bQS, r_bPQ = _blocks(rng, 2, 3, 2, 2)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  cot = rng.normal(size=(5, 4)).astype(np.float32)

  def fast(x, l, r):
    return jnp.sum(jnp.tanh(monarch.monarch_matmul(x, l, r)) * cot)

  def dense(x, l, r):
    return jnp.sum(jnp.tanh(x @ _dense_by_hand(l, r, jnp)) * cot)

  got = jax.grad(fast, argnums=(0, 1, 2))(x, l_bQS, r_bPQ)
  want = jax.grad(dense, argnums=(0, 1, 2))(x, l_bQS, r_bPQ)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_layer_applies_its_params_and_annotates_axes():
  layer = monarch.MonarchLinear(features=8, nblocks=2, hidden=4)
  x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
  variables = layer.init(jax.random.key(0), x)
  params = variables["params"]
  assert params["r_blocks"].names == (None, "embed", None)
  assert params["l_blocks"].names == (None, None, "mlp")
  assert params["bias"].names == ("mlp",)
  unboxed = jax.tree.map(np.asarray, nn.meta.unbox(params))
  assert unboxed["r_blocks"].shape == (2, 3, 2) and unboxed["l_blocks"].shape == (2, 2, 4)
  unboxed["bias"] = np.arange(8, dtype=np.float32)
  y, aux = layer.apply({"params": unboxed}, x)
  want = x @ _dense_by_hand(unboxed["l_blocks"], unboxed["r_blocks"]) + unboxed["bias"]
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert float(aux["metrics"]["param_fraction"]) == pytest.approx((12 + 16) / 48)
  assert aux["losses"] == {}


@pytest.mark.parametrize("kw,match", [
    (dict(in_features=6, features=8, nblocks=4), "in_features=6"),
    (dict(in_features=8, features=6, nblocks=4), "features=6"),
    (dict(in_features=8, features=8, nblocks=4, hidden=6), "hidden=6"),
    (dict(in_features=8, features=8, nblocks=0), "nblocks=0"),
])
def test_shapes_reject_widths_not_divisible_by_nblocks(kw, match):
  with pytest.raises(ValueError, match=match):
    monarch.monarch_shapes(**kw)


def test_matmul_rejects_mismatched_blocks():
  with pytest.raises(ValueError, match="l_blocks must be"):
    monarch.monarch_matmul(jnp.ones((1, 4)), jnp.ones((2, 3, 2)), jnp.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="input width"):
    monarch.monarch_matmul(jnp.ones((1, 5)), jnp.ones((2, 2, 2)), jnp.ones((2, 2, 2)))
