"""Expert-load heatmap: a PNG of the documented size, with title, axis labels, ticks, colour bar."""
import struct
import subprocess
import sys

import numpy as np
import pytest

from experiments import plots

LOAD_LE = np.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])


def png_size(data: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's signature and IHDR chunk, the first chunk of every PNG."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  length, kind = struct.unpack(">I4s", data[8:16])
  assert (length, kind) == (13, b"IHDR")
  return struct.unpack(">II", data[16:24])


def test_write_expert_load_writes_a_readable_png(tmp_path):
  path = tmp_path / "expert_load.png"
  plots.write_expert_load(str(path), LOAD_LE, 400, ["layer_0", "layer_1", "layer_3"])
  width, height = png_size(path.read_bytes())
  assert (width, height) == (plots.WIDTH_IN * plots.DPI, plots.MIN_HEIGHT_IN * plots.DPI)
  assert width >= 600


def test_figure_has_title_axis_labels_ticks_and_colour_bar():
  figure = plots.expert_load_figure(LOAD_LE, 400, ["layer_0", "layer_1", "layer_3"])
  heatmap, colour_bar = figure.axes
  assert heatmap.get_title() == "expert load at step 400 (fraction of routed tokens)"
  assert (heatmap.get_xlabel(), heatmap.get_ylabel()) == ("expert", "layer")
  assert [t.get_text() for t in heatmap.get_yticklabels()] == ["layer_0", "layer_1", "layer_3"]
  assert list(heatmap.get_xticks()) == [0, 1, 2, 3]
  np.testing.assert_array_equal(heatmap.images[0].get_array(), LOAD_LE)
  assert colour_bar.get_ylabel() == "fraction of routed tokens"


def test_layer_indices_label_rows_without_names_and_many_experts_get_sparse_ticks():
  figure = plots.expert_load_figure(np.full((2, 64), 1 / 64), 7)
  heatmap = figure.axes[0]
  assert [t.get_text() for t in heatmap.get_yticklabels()] == ["0", "1"]
  assert list(heatmap.get_xticks()) == list(range(0, 64, 4))


def test_taller_figure_for_many_layers(tmp_path):
  path = tmp_path / "deep.png"
  plots.write_expert_load(str(path), np.full((24, 8), 1 / 8), 0)
  _, height = png_size(path.read_bytes())
  assert height == round((plots.FRAME_IN + 24 * plots.ROW_IN) * plots.DPI)


@pytest.mark.parametrize("load, names, match", [
    (np.zeros(4), None, r"non-empty 2-D matrix \(layers, experts\), got shape \(4,\)"),
    (np.zeros((0, 4)), None, r"non-empty 2-D matrix \(layers, experts\), got shape \(0, 4\)"),
    (np.zeros((2, 4)), ["layer_0"], "layer_names has 1 names for 2 layers"),
])
def test_bad_input_is_a_clear_error(tmp_path, load, names, match):
  with pytest.raises(ValueError, match=match):
    plots.write_expert_load(str(tmp_path / "bad.png"), load, 0, names)
  assert not (tmp_path / "bad.png").exists()


def test_importing_plots_does_not_import_matplotlib():
  code = "import sys, experiments.plots; print('matplotlib' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "False"
