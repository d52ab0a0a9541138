"""Condensed constant-fan-in linear layer vs dense, and sparse vs dense checkpoint bytes.

`python -m experiments.bench masks [--json FILE] [--quick]`

What is measured (fp32, CPU, a 4096 -> 4096 layer at 90 % sparsity, i.e. K = 410 inputs per
output, a constant fan-in mask as SRigL trains; `--quick`: 512 -> 512):

* `dense_b{B}`: the baseline a user writes, `x @ w` with the dense (masked) kernel `[I, O]`.
* `condensed_b{B}`: the inference layer `sparsejax.masks.condensed.CondensedLinear` (no bias,
  `implementation="auto"`) with variables from `condensed.prepare_inference`: at B = 1 the
  gather formulation (x[idx] `[O, K]` times values, summed over K; int16 indices); at B = 256
  auto picks "densify", which multiplies the dense kernel the layer cached once instead of
  scattering the values every call (the gather loses to the dense matmul at large batch).
  Column `path` says which ran, `speedup_vs_dense_same_batch` = dense time / this time.
* `checkpoint_dense`, `checkpoint_dense_masked`, `checkpoint_sparse`: Orbax checkpoints of the
  layer's params: the dense trained layer, the same layout holding the masked kernel (90 %
  zeros, which Orbax's compression partly exploits), and `export.save_sparse` (kept values +
  packed bit mask). `median_s` is the save time; `disk_bytes` the bytes on disk;
  `bytes_vs_dense` and `bytes_vs_dense_masked` the ratios.

Timing is interleaved (`timing.interleaved_cases` / `interleaved_calls`: a warm-up round, then
rounds of every case in turn; median_s, min_s, max_s): the dense and condensed cases of one
batch together (20x `--repeats` rounds at B = 1, whose cases take well under a millisecond), and
the three checkpoint saves together (min(`--repeats`, 3) rounds, each save into a fresh
directory).

Lasby et al. 2023 (SRigL) report 3.4x over dense for online inference (B = 1) on CPU.
"""
import itertools
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments.bench import timing
from sparsejax.masks import condensed, export, structures

DESCRIPTION = "condensed constant-fan-in layer vs dense x@W (B=1, 256) and sparse checkpoint bytes"
BASELINE = "dense_b1"
# Columns of the README table (experiments/claims/readme.py): {row key: header}.
README_COLUMNS = {"speedup_vs_dense_same_batch": "speed-up vs dense, same batch",
                  "disk_bytes": "MB on disk", "bytes_vs_dense": "bytes vs dense checkpoint"}

FEATURES = 4096
QUICK_FEATURES = 512
DENSITY = 0.1
BATCHES = (1, 256)
SMALL_BATCH_REPEAT_FACTOR = 20  # sub-millisecond cases: more timed runs for a stable median


def make_layer(features: int, density: float, seed: int = 0) -> dict[str, Any]:
  """A random fan_in-masked kernel, its masked dense form and its condensed form."""
  rng = np.random.default_rng(seed)
  w_IO = rng.normal(size=(features, features)).astype(np.float32) / np.sqrt(features)
  scores_IO = rng.random((features, features))
  mask_IO = np.asarray(structures.select("fan_in", scores_IO, density))
  masked_IO = np.where(mask_IO, w_IO, np.float32(0))
  values_OK, idx_OK = export.to_condensed(masked_IO, mask_IO)
  return {"w": w_IO, "mask": mask_IO, "masked": masked_IO, "values": values_OK, "idx": idx_OK}


def dense_forward(x_BI: jax.Array, w_IO: jax.Array) -> jax.Array:
  return jnp.dot(x_BI, w_IO)


def condensed_inference(layer: dict[str, Any]) -> tuple[dict[str, Any],
                                                        Callable[..., jax.Array]]:
  """Inference variables of the bias-free `CondensedLinear` of `layer` (its dense kernel cached
  by `condensed.prepare_inference`) and its forward (variables, x) -> y."""
  features = layer["w"].shape[0]
  module = condensed.CondensedLinear(idx=layer["idx"], in_features=features, use_bias=False)
  variables = condensed.prepare_inference(
      module, {"params": {"values": jnp.asarray(layer["values"])}},
      jnp.zeros((1, features), jnp.float32))
  return variables, lambda variables, x_BI: module.apply(variables, x_BI)[0]


def _matmul_rows(layer: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
  features = layer["w"].shape[0]
  w_IO = jnp.asarray(layer["masked"])
  variables, condensed_forward = condensed_inference(layer)
  rows = []
  for batch in BATCHES:
    x_BI = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, features)), jnp.float32)
    reps = repeats * (SMALL_BATCH_REPEAT_FACTOR if batch <= condensed.GATHER_MAX_BATCH else 1)
    dense, sparse = timing.interleaved_cases({
        f"dense_b{batch}": (dense_forward, (x_BI, w_IO)),
        f"condensed_b{batch}": (condensed_forward, (variables, x_BI)),
    }, repeats=reps)
    path = "gather" if batch <= condensed.GATHER_MAX_BATCH else "densify"
    dense.update(batch=batch, path="dense", speedup_vs_dense_same_batch=1.0)
    sparse.update(batch=batch, path=path,
                  speedup_vs_dense_same_batch=dense["median_s"] / sparse["median_s"])
    rows += [dense, sparse]
  return rows


def _fresh_directory_save(save: Callable[[str], Any], root: str) -> Callable[[], Any]:
  """`save` into root/0, root/1, ...: a fresh directory on every call."""
  counter = itertools.count()
  return lambda: save(os.path.join(root, str(next(counter))))


def _checkpoint_rows(layer: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
  features = layer["w"].shape[0]
  bias_O = np.zeros(features, np.float32)
  from sparsejax.masks.mask import Mask  # pylint: disable=g-import-not-at-top
  masked = {"layer": {"bias": bias_O, "kernel": layer["masked"]}}
  mask = Mask.from_leaves({"layer": {"bias": np.ones(features, bool), "kernel": layer["mask"]}},
                          {"layer/kernel": "fan_in"})

  def save_dense(params):
    def save(directory):
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(directory, params)
      checkpointer.wait_until_finished()
    return save

  saves = {
      "checkpoint_dense": save_dense({"layer": {"bias": bias_O, "kernel": layer["w"]}}),
      "checkpoint_dense_masked": save_dense(masked),
      "checkpoint_sparse": lambda directory: export.save_sparse(directory, masked, mask),
  }
  with tempfile.TemporaryDirectory() as root:
    rows = timing.interleaved_calls(
        {name: _fresh_directory_save(save, os.path.join(root, name))
         for name, save in saves.items()}, repeats=max(1, min(repeats, 3)))
    for row in rows:
      row.update(peak_bytes=None,
                 disk_bytes=export.directory_bytes(os.path.join(root, row["case"], "0")))
  by_case = {row["case"]: row["disk_bytes"] for row in rows}
  for row in rows:
    row["bytes_vs_dense"] = row["disk_bytes"] / by_case["checkpoint_dense"]
    row["bytes_vs_dense_masked"] = row["disk_bytes"] / by_case["checkpoint_dense_masked"]
  return rows


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """Rows for the dense / condensed matmuls at each batch and the three checkpoints."""
  features = QUICK_FEATURES if quick else FEATURES
  layer = make_layer(features, DENSITY)
  rows = _matmul_rows(layer, repeats)
  for row in rows:
    row.update(features=features, density=DENSITY)
  return rows + _checkpoint_rows(layer, repeats)
