"""Sparse-IFT: widen a layer by 1 / sqrt(density) and mask it, so it keeps the dense FLOPs.

A dense I -> O layer costs I O multiply-adds per token. Its Sparse Wide version at density d has
widths I' = I k, O' = O k with k = 1 / sqrt(d), so d I' O' = I O. Widths are rounded to a
multiple m (default 8, friendly to vector units and block structures), and the density is then
recomputed from the rounded widths, d' = I O / (I' O'), so the FLOPs match exactly (d' I' O' =
I O). A side that is not widened (a model's input or output width) keeps its width and the
density absorbs it. Thangarasa et al. 2023, "Sparse-IFT: Sparse Iso-FLOP Transformations for
Maximizing Training Efficiency" (Sparse Wide).
"""
import math
from typing import NamedTuple


class SparseIFTLayer(NamedTuple):
  """A widened layer: its widths and the density that keeps the dense layer's FLOPs."""
  in_features: int
  features: int
  density: float


def _check_density(density: float) -> None:
  if not 0.0 < density <= 1.0:
    raise ValueError(f"sparse-IFT density must be in (0, 1], got density={density}")


def sparse_ift_width(width: int, density: float, multiple: int = 8) -> int:
  """round(width / sqrt(density)) to the nearest multiple of `multiple`, but at least `width`
  rounded up to a multiple: sparse_ift_width(512, 0.25) == 1024, sparse_ift_width(20, 1) == 24."""
  _check_density(density)
  if width < 1 or multiple < 1:
    raise ValueError(f"sparse-IFT width and multiple must be >= 1, got width={width}, "
                     f"multiple={multiple}")
  # Never narrower than the dense layer (else d' > 1 and the FLOPs would not match).
  return max(multiple * math.ceil(width / multiple),
             multiple * round(width / math.sqrt(density) / multiple))


def sparse_ift_layer(in_features: int, features: int, density: float, *, widen_in: bool = True,
                     widen_out: bool = True, multiple: int = 8) -> SparseIFTLayer:
  """The Sparse Wide version of a dense I -> O layer at target `density`: widened widths and the
  density d' = I O / (I' O') (<= 1) that keeps its FLOPs exactly (module docstring)."""
  _check_density(density)
  wide_in = sparse_ift_width(in_features, density, multiple) if widen_in else in_features
  wide_out = sparse_ift_width(features, density, multiple) if widen_out else features
  iso_density = in_features * features / (wide_in * wide_out)
  return SparseIFTLayer(wide_in, wide_out, iso_density)
