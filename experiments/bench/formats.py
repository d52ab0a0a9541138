"""Unstructured sparse layouts (CSR, bitmap) vs dense x@W and the condensed constant fan-in path.

`python -m experiments.bench formats [--json FILE] [--quick]`

What is measured (fp32, CPU, a 1024 -> 1024 layer at 90 % sparsity; `--quick`: 64 -> 64), at
batch B = 1 and 64, all cases of one batch timed interleaved (`timing.interleaved_cases`):

* `dense_b{B}`: the baseline a user writes, `x @ w` with the dense masked kernel `[I, O]`.
* `csr_b{B}`, `bitmap_b{B}`: `sparsejax.masks.formats.csr_matmul` / `bitmap_matmul` on a uniform
  random unstructured mask (nnz = 10 % of I O) with `implementation="auto"`: CSR takes the
  gather path at B = 1 and densify at B = 64 (`csr_gather_b64` forces gather there); the bitmap
  always decodes w by prefix counts, then one matmul (`bitmap_gather_b1` forces its
  coordinate-decoding gather path).
* `condensed_b{B}`: `condensed.condensed_matmul` on a constant fan-in mask (K = 0.1 I inputs
  per output, as SRigL trains) of the same density.
* `dense_grad_b{B}`, `csr_grad_b{B}`, `bitmap_grad_b{B}`: value and gradient of sum(y * t) in x
  and in the weights (dense W, resp. the stored values: SparseProp's sparse backward).

Column `path` says which formulation ran; `speedup_vs_dense_same_batch` = the dense case of the
same batch and kind (forward, or forward + backward) / this case.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from sparsejax.masks import condensed, export, formats, structures

DESCRIPTION = "CSR / bitmap / condensed sparse layouts vs dense x@W (B=1, 64), forward and grad"
BASELINE = "dense_b1"

FEATURES = 1024
QUICK_FEATURES = 64
DENSITY = 0.1
BATCHES = (1, 64)
SMALL_BATCH_REPEAT_FACTOR = 10  # sub-millisecond cases: more rounds for a stable median


def make_layers(features: int, density: float, seed: int = 0) -> dict[str, Any]:
  """A random unstructured-masked kernel as dense / CSR / bitmap, and a fan_in one condensed."""
  rng = np.random.default_rng(seed)
  w_IO = (rng.normal(size=(features, features)) / np.sqrt(features)).astype(np.float32)
  mask_IO = np.asarray(structures.select("unstructured", rng.random(w_IO.shape), density))
  masked_IO = np.where(mask_IO, w_IO, np.float32(0))
  fan_in_IO = np.asarray(structures.select("fan_in", rng.random(w_IO.shape), density))
  values_OK, idx_OK = export.to_condensed(np.where(fan_in_IO, w_IO, 0), fan_in_IO)
  return {"dense": jnp.asarray(masked_IO), "csr": formats.to_csr(masked_IO, mask_IO),
          "bitmap": formats.to_bitmap(masked_IO, mask_IO),
          "condensed": (jnp.asarray(values_OK), jnp.asarray(idx_OK))}


def _grad_of(forward):
  """(x, weights, t, *rest) -> value and gradients of sum(forward(x, weights, *rest) * t) in x
  and weights (the layout goes in as an argument, so XLA cannot constant-fold its indices)."""
  return jax.value_and_grad(lambda x, weights, t, *rest: jnp.sum(forward(x, weights, *rest) * t),
                            argnums=(0, 1))


def _forced(matmul, implementation):
  return lambda x, layout: matmul(x, layout, implementation)


def _cases(layers: dict[str, Any], batch: int) -> dict[str, tuple]:
  features = layers["dense"].shape[0]
  x_BI = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, features)), jnp.float32)
  t_BO = jnp.asarray(np.random.default_rng(batch + 1).normal(size=(batch, features)),
                     jnp.float32)
  dense, csr, bitmap = layers["dense"], layers["csr"], layers["bitmap"]
  values_OK, idx_OK = layers["condensed"]
  cases = {
      f"dense_b{batch}": (jnp.dot, (x_BI, dense)),
      f"csr_b{batch}": (formats.csr_matmul, (x_BI, csr)),
      f"bitmap_b{batch}": (formats.bitmap_matmul, (x_BI, bitmap)),
      f"condensed_b{batch}": (condensed.condensed_matmul, (x_BI, values_OK, idx_OK)),
  }
  if batch > condensed.GATHER_MAX_BATCH:
    cases[f"csr_gather_b{batch}"] = (_forced(formats.csr_matmul, "gather"), (x_BI, csr))
  else:
    cases[f"bitmap_gather_b{batch}"] = (_forced(formats.bitmap_matmul, "gather"), (x_BI, bitmap))
  cases.update({
      f"dense_grad_b{batch}": (_grad_of(jnp.dot), (x_BI, dense, t_BO)),
      f"csr_grad_b{batch}": (
          _grad_of(lambda x, v, layout: formats.csr_matmul(x, layout.replace(values=v))),
          (x_BI, csr.values, t_BO, csr)),
      f"bitmap_grad_b{batch}": (
          _grad_of(lambda x, v, layout: formats.bitmap_matmul(x, layout.replace(values=v))),
          (x_BI, bitmap.values, t_BO, bitmap)),
  })
  return cases


def _path(case: str, batch: int) -> str:
  if case.startswith("dense"):
    return "dense"
  if "gather" in case or (batch <= condensed.GATHER_MAX_BATCH and not case.startswith("bitmap")):
    return "gather"
  return "densify"


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """Rows for every layout at each batch, forward and forward + backward."""
  features = QUICK_FEATURES if quick else FEATURES
  layers = make_layers(features, DENSITY)
  rows = []
  for batch in BATCHES:
    reps = repeats * (SMALL_BATCH_REPEAT_FACTOR if batch <= condensed.GATHER_MAX_BATCH else 1)
    batch_rows = timing.interleaved_cases(_cases(layers, batch), repeats=reps)
    base = {kind: next(r["median_s"] for r in batch_rows if r["case"] == f"dense{kind}_b{batch}")
            for kind in ("", "_grad")}
    for row in batch_rows:
      kind = "_grad" if "_grad_" in row["case"] else ""
      row.update(batch=batch, path=_path(row["case"], batch), features=features,
                 density=DENSITY, speedup_vs_dense_same_batch=base[kind] / row["median_s"])
    rows += batch_rows
  return rows
