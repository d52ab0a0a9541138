"""CSR and bitmap layouts: round trips, outputs and gradients against the dense masked matmul."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.masks import formats


def _layer(seed, inputs=12, outputs=10, density=0.3):
  rng = np.random.default_rng(seed)
  mask_IO = rng.random((inputs, outputs)) < density
  mask_IO[:, 3] = False   # an output with no inputs (empty CSR row)
  mask_IO[5, :] = False   # an input that feeds nothing (empty transposed row)
  w_IO = np.where(mask_IO, rng.normal(size=(inputs, outputs)), 0).astype(np.float32)
  return w_IO, mask_IO


LAYOUTS = {"csr": (formats.to_csr, formats.from_csr, formats.csr_matmul),
           "bitmap": (formats.to_bitmap, formats.from_bitmap, formats.bitmap_matmul)}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_with_spare_capacity(name):
  to, back, _ = LAYOUTS[name]
  w_IO, mask_IO = _layer(0)
  layout = to(w_IO, mask_IO, capacity=int(mask_IO.sum()) + 5)
  got_w, got_mask = back(layout)
  np.testing.assert_array_equal(got_mask, mask_IO)
  np.testing.assert_array_equal(got_w, w_IO)


def test_csr_arrays_on_a_hand_worked_kernel():
  w_IO = np.array([[1., 0., 2.], [0., 0., 3.]], np.float32)  # w^T rows: [1, 0], [0, 0], [2, 3]
  csr = formats.to_csr(w_IO, w_IO != 0, capacity=4)
  np.testing.assert_array_equal(csr.indptr, [0, 1, 1, 3])
  np.testing.assert_array_equal(csr.indices, [0, 0, 1, 2])
  np.testing.assert_array_equal(csr.values, [1, 2, 3, 0])
  np.testing.assert_array_equal(csr.transpose_perm, [0, 1, 2, 3])  # (i, o): (0,0) (0,2) (1,2)
  np.testing.assert_array_equal(csr.transpose_indptr, [0, 2, 3])
  assert (csr.max_row_nnz, csr.max_col_nnz) == (2, 2)
  bitmap = formats.to_bitmap(w_IO, w_IO != 0)
  np.testing.assert_array_equal(bitmap.bits, [0b10001100])  # w^T row-major: 1 0 0 0 1 1
  np.testing.assert_array_equal(bitmap.values, [1, 2, 3])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("implementation", ["gather", "densify"])
def test_outputs_and_gradients_match_the_dense_masked_matmul(name, implementation):
  to, _, matmul = LAYOUTS[name]
  w_IO, mask_IO = _layer(1)
  layout = to(w_IO, mask_IO, capacity=int(mask_IO.sum()) + 3)
  x_BI = np.random.default_rng(2).normal(size=(3, 12)).astype(np.float32)
  t_BO = np.random.default_rng(3).normal(size=(3, 10)).astype(np.float32)

  def sparse_loss(x_BI, values_C):
    y_BO = matmul(x_BI, layout.replace(values=values_C), implementation)
    return jnp.sum(y_BO * t_BO), y_BO

  (_, y_BO), (dx_BI, dv_C) = jax.value_and_grad(sparse_loss, argnums=(0, 1), has_aux=True)(
      jnp.asarray(x_BI), layout.values)
  np.testing.assert_allclose(y_BO, x_BI @ w_IO, atol=1e-5)
  np.testing.assert_allclose(dx_BI, t_BO @ w_IO.T, atol=1e-5)
  dw_IO = x_BI.T @ t_BO  # dense dW; the layout must hold it at its entries, 0 at padding
  rows, cols = np.nonzero(mask_IO.T)
  nnz = rows.size
  np.testing.assert_allclose(dv_C[:nnz], dw_IO[cols, rows], atol=1e-5)
  np.testing.assert_array_equal(dv_C[nnz:], 0)


def test_auto_jit_and_leading_dims():
  w_IO, mask_IO = _layer(4)
  csr = formats.to_csr(w_IO, mask_IO)
  x_ABI = np.random.default_rng(5).normal(size=(2, 1, 12)).astype(np.float32)
  bitmap = formats.to_bitmap(w_IO, mask_IO)
  for matmul, layout in ((formats.csr_matmul, csr), (formats.bitmap_matmul, bitmap)):
    np.testing.assert_allclose(jax.jit(matmul)(x_ABI, layout), x_ABI @ w_IO, atol=1e-5)


def test_bad_inputs_raise():
  w_IO, mask_IO = _layer(6)
  with pytest.raises(ValueError, match="capacity=1"):
    formats.to_csr(w_IO, mask_IO, capacity=1)
  with pytest.raises(ValueError, match="same shape"):
    formats.to_bitmap(w_IO, mask_IO[:, :3])
  csr = formats.to_csr(w_IO, mask_IO)
  with pytest.raises(ValueError, match="implementation"):
    formats.csr_matmul(np.zeros((1, 12), np.float32), csr, "dense")
  with pytest.raises(ValueError, match="in_dim=12"):
    formats.csr_matmul(np.zeros((1, 7), np.float32), csr)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_an_empty_mask_gives_zero_outputs_and_gradients(name):
  to, _, matmul = LAYOUTS[name]
  w_IO = np.ones((4, 3), np.float32)
  layout = to(w_IO, np.zeros((4, 3), bool))  # default capacity: one padding entry
  x_BI = np.ones((2, 4), np.float32)
  for implementation in ("gather", "densify"):
    loss = lambda x, v: jnp.sum(matmul(x, layout.replace(values=v), implementation))
    np.testing.assert_array_equal(matmul(x_BI, layout, implementation), np.zeros((2, 3)))
    dx_BI, dv_C = jax.grad(loss, argnums=(0, 1))(x_BI, layout.values)
    np.testing.assert_array_equal(dx_BI, np.zeros((2, 4)))
    np.testing.assert_array_equal(dv_C, np.zeros(1))
  with pytest.raises(ValueError, match="capacity=0"):
    to(w_IO, np.zeros((4, 3), bool), capacity=0)
