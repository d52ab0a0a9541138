"""Training plots written as PNG files with matplotlib (Agg backend, imported on first use)."""
import numpy as np

DPI = 100
# Figure width in inches: DPI * 8 = 800 px, wide enough for 64 expert columns to stay readable.
WIDTH_IN = 8.0
# Figure height in inches: the title, x axis and margins, plus one row per layer, at least 300 px.
FRAME_IN = 1.5
ROW_IN = 0.35
MIN_HEIGHT_IN = 3.0


def write_expert_load(path: str, load_LE: np.ndarray, step: int,
                      layer_names: list[str] | None = None) -> None:
  """Writes a heatmap of per-layer expert load fractions (layers x experts) as a PNG at `path`.

  Row l, column e holds the fraction of layer l's routed tokens that expert e received (1 / E
  everywhere under perfect balance). The y ticks are `layer_names` (default: the row indices);
  a colour bar gives the scale. Raises ValueError for a matrix that is not 2-D, is empty, or
  whose row count differs from len(layer_names).
  """
  expert_load_figure(load_LE, step, layer_names).savefig(path, dpi=DPI)


def expert_load_figure(load_LE: np.ndarray, step: int, layer_names: list[str] | None = None):
  """The matplotlib Figure that `write_expert_load` saves, on an Agg canvas (pyplot unused)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: keeps imports fast.
  from matplotlib.figure import Figure

  load_LE = _checked_load(load_LE, layer_names)
  num_layers, num_experts = load_LE.shape
  height_in = max(MIN_HEIGHT_IN, FRAME_IN + ROW_IN * num_layers)
  figure = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(load_LE, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
  axes.set_xlabel("expert")
  axes.set_ylabel("layer")
  axes.set_title(f"expert load at step {step} (fraction of routed tokens)")
  axes.set_xticks(_expert_ticks(num_experts))
  axes.set_yticks(np.arange(num_layers), labels=layer_names or [str(l) for l in range(num_layers)])
  figure.colorbar(image, ax=axes, label="fraction of routed tokens")
  return figure


def _checked_load(load_LE: np.ndarray, layer_names: list[str] | None) -> np.ndarray:
  """`load_LE` as a float array, or a ValueError naming what is wrong with it."""
  load_LE = np.asarray(load_LE, np.float64)
  if load_LE.ndim != 2 or load_LE.size == 0:
    raise ValueError(f"load_LE must be a non-empty 2-D matrix (layers, experts), got shape "
                     f"{load_LE.shape}")
  if layer_names is not None and len(layer_names) != load_LE.shape[0]:
    raise ValueError(f"layer_names has {len(layer_names)} names for {load_LE.shape[0]} layers "
                     f"(rows of load_LE)")
  return load_LE


def _expert_ticks(num_experts: int) -> np.ndarray:
  """Every expert index up to 32 experts, else every ceil(E / 16)-th (at most 16 ticks)."""
  stride = 1 if num_experts <= 32 else -(-num_experts // 16)
  return np.arange(0, num_experts, stride)
