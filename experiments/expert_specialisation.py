"""Expert specialisation of a trained classifier: its class x expert routing frequency heatmap.

  python -m experiments.expert_specialisation --workdir=DIR [--out=PNG]

DIR is a finished `experiments.train` run of a "classify" config whose MoE layers sow their
routing ("class_constrained_moe", e.g. experiments/configs/moe_cnn_constrained.py). The model
runs on every example of the eval split with the free (test-time) router; for each MoE layer,
row y, column e of its matrix is the fraction of class-y positions routed to expert e
(`sparsejax.moe.class_constrained.routing_frequency`). Writes the heatmaps (one panel per
layer; the experts assigned to each class outlined) to PNG (default DIR/expert_specialisation.png)
and the matrices with each layer's in-class fraction (the share of test positions sent to an
expert assigned to their class) to DIR/expert_specialisation.json.
"""
import argparse
import json
import os
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import checkpoints as ckpt_lib
from experiments import tasks
from sparsejax.moe import class_constrained

DPI = 90
PANEL_IN = 4.0  # inches per layer panel


def class_routing_frequency(model, variables, batches, num_classes: int
                            ) -> dict[str, np.ndarray]:
  """{layer path: F_YE} from the routes `model` sows on `batches` (deterministic, no labels).

  batches: dicts with "inputs", integer "targets" and "weights" (weight-0 padding rows are
  left out). E is read off each layer's "router_DE" param.
  """
  apply = jax.jit(lambda v, x: model.apply(v, x, deterministic=True,
                                           mutable=["intermediates"])[1]["intermediates"])
  routes, labels, keep = {}, [], []
  for batch in batches:
    sown = flax.traverse_util.flatten_dict(apply(variables, batch["inputs"]), sep="/")
    for path, (expert_TK,) in sown.items():
      if path.endswith("/" + class_constrained.ROUTES):
        routes.setdefault(path.rsplit("/", 1)[0], []).append(np.asarray(expert_TK))
    labels.append(np.asarray(batch["targets"]))
    keep.append(np.asarray(batch["weights"]) > 0)
  if not routes:
    raise ValueError("the model sows no routes; only 'class_constrained_moe' layers do")
  labels_N, keep_N = np.concatenate(labels), np.concatenate(keep)
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  freqs = {}
  for layer, chunks in routes.items():
    expert_TK = np.concatenate(chunks)
    per_example = expert_TK.shape[0] // labels_N.shape[0]
    keep_TK = np.broadcast_to(np.repeat(keep_N, per_example)[:, None], expert_TK.shape)
    num_experts = params[f"{layer}/router_DE"].shape[-1]
    freqs[layer] = np.asarray(class_constrained.routing_frequency(
        jnp.asarray(expert_TK), jnp.asarray(keep_TK), jnp.asarray(np.repeat(labels_N,
                                                                            per_example)),
        num_classes, num_experts))
  return freqs


def in_class_fraction(freq_YE: np.ndarray, assignment_YE: np.ndarray) -> float:
  """mean_y sum_e F[y, e] A[y, e]: the share of routing inside each class's expert set (each
  class weighted equally)."""
  return float(np.mean(np.sum(freq_YE * assignment_YE, axis=1)))


def specialisation_figure(freqs: dict[str, np.ndarray], assignment_YE: np.ndarray | None,
                          title: str):
  """One heatmap panel per layer (rows classes, columns experts); assigned cells outlined."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: keeps imports fast.
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  figure = Figure(figsize=(PANEL_IN * len(freqs) + 1.0, PANEL_IN + 0.6), dpi=DPI,
                  layout="constrained")
  FigureCanvasAgg(figure)
  panels = figure.subplots(1, len(freqs), squeeze=False)[0]
  for axes, (layer, freq_YE) in zip(panels, sorted(freqs.items())):
    image = axes.imshow(freq_YE, aspect="auto", interpolation="nearest", cmap="viridis",
                        vmin=0.0, vmax=1.0)
    num_classes, num_experts = freq_YE.shape
    axes.set_xticks(np.arange(num_experts))
    axes.set_yticks(np.arange(num_classes))
    axes.set_xlabel("expert")
    axes.set_ylabel("class")
    name = layer
    if assignment_YE is not None:
      for y, e in zip(*np.nonzero(assignment_YE)):
        axes.add_patch(Rectangle((e - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="white",
                                 linewidth=1.5))
      name += f"\nin-class {in_class_fraction(freq_YE, assignment_YE):.2f}"
    axes.set_title(name, fontsize=9)
  figure.colorbar(image, ax=panels[-1], label="fraction of the class's positions")
  figure.suptitle(title)
  return figure


def _assignment(classifier: ml_collections.ConfigDict, num_classes: int) -> np.ndarray | None:
  """The class x expert assignment of a class-constrained FFN config, else None."""
  if classifier.get("ffn") != "class_constrained_moe":
    return None
  kwargs = dict(classifier.get("ffn_kwargs", {}))
  return class_constrained.class_expert_assignment(
      num_classes, kwargs.get("num_experts", 8), kwargs.get("experts_per_class", 1))


def write_specialisation(workdir: str, out: str | None = None) -> dict:
  """Writes the heatmap PNG and the JSON for the "classify" run in `workdir`; returns the JSON."""
  config, step, saved = ckpt_lib.restore_run(workdir, "classify")
  task = tasks.build_task(config)
  num_classes = task.model.num_classes
  variables = {"params": saved["params"], **saved["model_state"]}
  freqs = class_routing_frequency(task.model, variables, task.eval_batches, num_classes)
  assignment_YE = _assignment(config.classifier, num_classes)
  out = out or os.path.join(workdir, "expert_specialisation.png")
  title = f"routing frequency on {config.data.name}[{config.data.eval_split}], step {step}"
  specialisation_figure(freqs, assignment_YE, title).savefig(out, dpi=DPI)
  record = {"workdir": os.path.abspath(workdir), "step": step, "png": os.path.abspath(out),
            "layers": {layer: {"frequency_YE": freq.round(4).tolist(),
                               **({} if assignment_YE is None else {
                                   "in_class_fraction": in_class_fraction(freq, assignment_YE)})}
                       for layer, freq in sorted(freqs.items())}}
  with open(os.path.join(workdir, "expert_specialisation.json"), "w") as f:
    json.dump(record, f, indent=1)
  return record


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.expert_specialisation",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished 'classify' run")
  parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/"
                      "expert_specialisation.png)")
  args = parser.parse_args(argv)
  try:
    record = write_specialisation(args.workdir, args.out)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for layer, entry in record["layers"].items():
    print(f"{layer}: class x expert routing frequency")
    print(np.array2string(np.asarray(entry["frequency_YE"]), precision=2, suppress_small=True))
    if "in_class_fraction" in entry:
      print(f"in-class fraction: {entry['in_class_fraction']:.3f}")
  print(f"wrote {record['png']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
