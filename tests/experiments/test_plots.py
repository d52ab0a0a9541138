"""PNG heatmaps: decoded independently (chunk CRCs, zlib, filter bytes) back to the pixels."""
import struct
import zlib

import numpy as np
import pytest

from experiments import plots


def decode_png(data: bytes) -> np.ndarray:
  """A minimal decoder for 8-bit RGB PNGs with filter type 0, checking every CRC."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, idat, header = 8, b"", None
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(kind + body)
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat += body
    pos += 12 + length
  width, height, depth, color = header[:4]
  assert (depth, color) == (8, 2)
  raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
  assert np.all(raw[:, 0] == 0)
  return raw[:, 1:].reshape(height, width, 3)


def test_heatmap_roundtrip(tmp_path):
  matrix = np.array([[0.0, 0.5], [1.0, 0.25], [0.75, 0.0]])
  path = tmp_path / "h.png"
  plots.write_heatmap_png(str(path), matrix, cell=3)
  image = decode_png(path.read_bytes())
  assert image.shape == (9, 6, 3)
  np.testing.assert_array_equal(image[0, 0], [13, 8, 135])  # 0 -> first anchor
  np.testing.assert_array_equal(image[3, 0], [240, 249, 33])  # max -> last anchor
  np.testing.assert_array_equal(image[1, 4], [204, 71, 120])  # 0.5 -> middle anchor
  # 0.25 of the max sits on the second anchor; cells are constant blocks of 3x3.
  np.testing.assert_array_equal(image[3:6, 3:6], np.broadcast_to([126, 3, 168], (3, 3, 3)))


def test_heatmap_rejects_bad_shapes():
  with pytest.raises(ValueError, match="non-empty 2-D"):
    plots.heatmap_rgb(np.zeros(4))
