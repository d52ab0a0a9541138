"""Sparse-IFT widths and iso-FLOP densities, worked by hand."""
import pytest

from sparsejax.masks import sparse_ift


def test_width_is_width_over_sqrt_density_rounded_to_the_multiple():
  assert sparse_ift.sparse_ift_width(512, 0.25) == 1024  # 512 / 0.5
  assert sparse_ift.sparse_ift_width(512, 1.0) == 512
  assert sparse_ift.sparse_ift_width(100, 0.5) == 144  # 141.42 -> 17.68 * 8 -> 18 * 8
  assert sparse_ift.sparse_ift_width(100, 0.5, multiple=1) == 141
  assert sparse_ift.sparse_ift_width(3, 0.9) == 8  # at least one multiple


def test_layer_density_keeps_the_dense_flops():
  layer = sparse_ift.sparse_ift_layer(256, 1024, 0.25)
  assert layer == (512, 2048, 0.25)  # 0.25 * 512 * 2048 == 256 * 1024
  odd = sparse_ift.sparse_ift_layer(100, 100, 0.5)
  assert odd.in_features == odd.features == 144
  assert odd.density == pytest.approx(10000 / 144**2)
  assert odd.density * 144 * 144 == pytest.approx(100 * 100)


def test_a_fixed_side_keeps_its_width_and_the_density_absorbs_it():
  layer = sparse_ift.sparse_ift_layer(64, 256, 0.25, widen_in=False)
  assert layer == (64, 512, 0.5)  # only O doubles, so half the weights are kept
  assert sparse_ift.sparse_ift_layer(64, 256, 0.25, widen_in=False, widen_out=False) == (
      64, 256, 1.0)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_rejects_density_outside_unit_interval(density):
  with pytest.raises(ValueError, match=f"density={density}"):
    sparse_ift.sparse_ift_width(64, density)


def test_a_width_off_the_multiple_is_never_narrowed_so_the_flops_still_match():
  # 20 / sqrt(1) = 20 rounds to 16 < 20; widths round up to 24 instead, d' = 400 / 576.
  assert sparse_ift.sparse_ift_width(20, 1.0) == 24
  layer = sparse_ift.sparse_ift_layer(20, 20, 1.0)
  assert layer == (24, 24, pytest.approx(400 / 576))
  assert layer.density * 24 * 24 == pytest.approx(20 * 20)
