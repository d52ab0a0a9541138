"""Dependency-free PNG heatmaps (e.g. expert load per layer), written with zlib alone."""
import struct
import zlib

import numpy as np

# A dark-blue -> yellow ramp (5 anchors, linearly interpolated), readable in print and for
# colour-blind readers.
_ANCHORS_RGB = np.array(
    [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
  """uint8 RGB [..., 3] for values in [0, 1] (clipped), along the 5-anchor ramp."""
  position = np.clip(values, 0.0, 1.0) * (len(_ANCHORS_RGB) - 1)
  low = np.minimum(np.floor(position).astype(int), len(_ANCHORS_RGB) - 2)
  frac = (position - low)[..., None]
  rgb = _ANCHORS_RGB[low] * (1 - frac) + _ANCHORS_RGB[low + 1] * frac
  return np.round(rgb).astype(np.uint8)


def heatmap_rgb(matrix: np.ndarray, cell: int = 16, vmax: float | None = None) -> np.ndarray:
  """uint8 image [rows*cell, cols*cell, 3] of `matrix` scaled to [0, vmax] (default: its max)."""
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.size == 0:
    raise ValueError(f"heatmap needs a non-empty 2-D matrix, got shape {matrix.shape}")
  top = float(np.max(matrix)) if vmax is None else vmax
  scaled = matrix / top if top > 0 else np.zeros_like(matrix)
  return np.repeat(np.repeat(colormap(scaled), cell, axis=0), cell, axis=1)


def encode_png(rgb: np.ndarray) -> bytes:
  """PNG bytes of an 8-bit RGB image [H, W, 3] (filter type 0 on every row)."""
  height, width, _ = rgb.shape
  rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def write_heatmap_png(path: str, matrix: np.ndarray, cell: int = 16) -> None:
  """Writes `matrix` (e.g. [layers, experts] load fractions) as a PNG heatmap at `path`."""
  with open(path, "wb") as f:
    f.write(encode_png(heatmap_rgb(matrix, cell)))
