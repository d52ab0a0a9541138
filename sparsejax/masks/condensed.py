"""Condensed constant-fan-in linear layer: each output reads exactly K of the I inputs.

A kernel w_IO whose mask keeps the same number K of inputs for every output (fan_in and N:M
structures) is stored condensed as values_OK (the kept weights of output o) and idx_OK (their
input indices, int16 when I fits, else int32); see `sparsejax.masks.export.to_condensed`.

  y[b, o] = sum_k x[b, idx[o, k]] values[o, k]

Two formulations (`implementation`):

  gather    per row b, x_b[idx_OK] `[O, K]` then a multiply-sum over K: O K multiply-adds per row
            instead of I O, reading O K (values + indices) instead of I O weights. This is
            the fast one for online inference (small B) on CPU. Its gradient is a gather /
            scatter-add, differentiated by JAX.
  densify   scatter values into a dense w_IO, then x w: for large batches, where the dense
            matmul's compute efficiency outweighs the K / I saving of the gather.
  auto      gather for B <= GATHER_MAX_BATCH rows, densify above.

Re-scattering every call costs more than the matmul at large batch, so for inference the dense
kernel is built once: `prepare_inference(model, variables, x)` stores each `CondensedLinear`'s
densify(values, idx) in the variable collection CACHE_COLLECTION, and the densify path then
multiplies that cached kernel (the dense layer's cost) while small batches still gather.

Lasby et al. 2023, "Dynamic Sparse Training with Structured Sparsity" (SRigL), sec. 5
("condensed" representation, 3.4x over dense for online inference on CPU).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GATHER_MAX_BATCH = 8
IMPLEMENTATIONS = ("auto", "gather", "densify")
CACHE_COLLECTION = "condensed_cache"


def condensed_matmul(x_BI: jax.Array, values_OK: jax.Array, idx_OK: jax.Array,
                     implementation: str = "auto", dense_IO: jax.Array | None = None) -> jax.Array:
  """y_BO = sum_k x[:, idx[o, k]] values[o, k] (see the module docstring), for x `[..., I]`.

  `dense_IO`: densify(values, idx, I) built beforehand; the densify path multiplies it instead of
  scattering the values again (it must match values and idx, and gets no gradient to them).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if values_OK.shape != idx_OK.shape or values_OK.ndim != 2:
    raise ValueError(f"values and idx must both be [O, K]; got {values_OK.shape} and "
                     f"{idx_OK.shape}")
  lead, in_dim = x_BI.shape[:-1], x_BI.shape[-1]
  x_BI = x_BI.reshape(-1, in_dim)
  rows = x_BI.shape[0]
  if implementation == "auto":
    implementation = "gather" if rows <= GATHER_MAX_BATCH else "densify"
  if implementation == "gather":
    # One gather per row (lax.map): XLA's CPU gather is much slower batched or vmapped.
    y_BO = jax.lax.map(lambda x_I: _gather_row(x_I, values_OK, idx_OK), x_BI)
  else:
    if dense_IO is None:
      dense_IO = densify(values_OK, idx_OK, in_dim)
    elif dense_IO.shape != (in_dim, values_OK.shape[0]):
      raise ValueError(f"dense_IO must be [I, O] = {(in_dim, values_OK.shape[0])}, got "
                       f"{dense_IO.shape}")
    y_BO = jnp.dot(x_BI, dense_IO.astype(x_BI.dtype))
  return y_BO.reshape(*lead, values_OK.shape[0])


def _gather_row(x_I: jax.Array, values_OK: jax.Array, idx_OK: jax.Array) -> jax.Array:
  """y_O = sum_k x[idx[o, k]] values[o, k] for one input row."""
  x_OK = jnp.take(x_I, idx_OK.astype(jnp.int32), axis=0, mode="clip")
  return jnp.sum(x_OK * values_OK, axis=-1)


def densify(values_OK: jax.Array, idx_OK: jax.Array, in_dim: int) -> jax.Array:
  """w_IO with w[idx[o, k], o] = values[o, k] and zeros elsewhere (indices distinct per output)."""
  out_dim = values_OK.shape[0]
  cols_OK = jnp.broadcast_to(jnp.arange(out_dim)[:, None], idx_OK.shape)
  return jnp.zeros((in_dim, out_dim), values_OK.dtype).at[
      idx_OK.astype(jnp.int32), cols_OK].set(values_OK, unique_indices=True)


def prepare_inference(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, Any]:
  """`variables` plus the dense kernel of every `CondensedLinear` in `model`, built once.

  Runs `model.apply(variables, *args, **kwargs)` with CACHE_COLLECTION mutable, so each layer
  stores w_IO = densify(values, idx, I) there; large batches then cost one dense matmul. For
  inference only: the cache does not follow later changes of `values`, and gradients do not
  reach `values` through it (train without the collection).
  """
  _, cache = model.apply(variables, *args, mutable=[CACHE_COLLECTION], **kwargs)
  return {**variables, **cache}


class CondensedLinear(nn.Module):
  """y = condensed_matmul(x, values, idx) + b, a constant-fan-in sparse `nn.Dense`.

  `idx` is a static NumPy `[O, K]` array of distinct input indices per output (from
  `export.to_condensed`); the param `values` `[O, K]` holds the weights (LeCun-normal with
  fan-in K by default). Returns `(y [..., O], aux)` with aux = {"losses": {}, "metrics":
  {"density": K / I}}. With the collection CACHE_COLLECTION present ("kernel_IO", written by
  `prepare_inference`) the densify path multiplies the cached dense kernel.

  Attributes:
    idx: static NumPy int array `[O, K]`.
    in_features: I.
    use_bias: add a bias `[O]`.
    implementation: "auto", "gather" or "densify" (see `condensed_matmul`).
  """
  idx: np.ndarray
  in_features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  values_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2)
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, dict[str, Any]]]:
    idx_OK = np.asarray(self.idx)
    if idx_OK.ndim != 2 or (idx_OK.size and not 0 <= idx_OK.min() <= idx_OK.max()
                            < self.in_features):
      raise ValueError(f"idx must be [O, K] with entries in [0, {self.in_features}), got shape "
                       f"{idx_OK.shape}")
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x's last dim must be in_features={self.in_features}, got {x.shape}")
    values_OK = self.param("values", self.values_init, idx_OK.shape, jnp.float32)
    dense_IO = None
    if self.has_variable(CACHE_COLLECTION, "kernel_IO") or (
        self.is_mutable_collection(CACHE_COLLECTION) and not self.is_initializing()):
      dense_IO = self.variable(CACHE_COLLECTION, "kernel_IO", densify, values_OK,
                               jnp.asarray(idx_OK), self.in_features).value
    y = condensed_matmul(x.astype(self.dtype), values_OK.astype(self.dtype),
                         jnp.asarray(idx_OK), self.implementation, dense_IO)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (idx_OK.shape[0],), jnp.float32).astype(
          self.dtype)
    density = idx_OK.shape[1] / self.in_features
    return y, {"losses": {}, "metrics": {"density": jnp.asarray(density, jnp.float32)}}
