"""Expert FFNs evaluated on expert-major rows: capacity buffers or grouped sorted rows.

"ffn":    y = gelu(x W_i) W_o                      (Vaswani et al., 2017; GELU as in GShard)
"swiglu": y = (silu(x W_g) * (x W_i)) W_o          (Shazeer, 2020, "GLU Variants")
Weights are a dict {"wi_EDF", "wo_EFD"} plus "wg_EDF" for swiglu.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from kernels import gmm as gmm_lib

EXPERT_KINDS = ("ffn", "swiglu")


def check_expert_kind(kind: str) -> None:
  if kind not in EXPERT_KINDS:
    raise ValueError(f"expert must be one of {EXPERT_KINDS}, got {kind!r}")


def _ffn(x, weights: dict[str, jax.Array], kind: str, matmul: Callable) -> jax.Array:
  """The expert FFN with `matmul(x, w)` applying each row's expert weight."""
  check_expert_kind(kind)
  h = matmul(x, weights["wi_EDF"])
  if kind == "swiglu":
    h = jax.nn.silu(matmul(x, weights["wg_EDF"])) * h
  else:
    h = jax.nn.gelu(h)
  return matmul(h, weights["wo_EFD"])


def experts_batched(x_ECD: jax.Array, weights: dict[str, jax.Array], kind: str) -> jax.Array:
  """Expert e's FFN on its capacity buffer x_ECD[e]: `[E, C, D]` -> `[E, C, D]`."""
  return _ffn(x_ECD, weights, kind, lambda x, w: jnp.einsum("ecd,edf->ecf", x, w))


def experts_grouped(x_MD: jax.Array, weights: dict[str, jax.Array], group_sizes_E: jax.Array,
                    kind: str, *, implementation: str = "auto",
                    tile: int = gmm_lib.DEFAULT_TILING[0]) -> jax.Array:
  """Expert FFNs on expert-sorted rows (group e = rows of expert e): `[M, D]` -> `[M, D]`.

  Each matmul is `kernels.gmm.gmm` with `implementation` ("auto", "pallas", "xla" or
  "reference") and row tile `tile` (the kernel's default K and N tiles).
  """
  tiling = (tile,) + gmm_lib.DEFAULT_TILING[1:]
  return _ffn(x_MD, weights, kind, lambda x, w: gmm_lib.gmm(
      x, w, group_sizes_E, implementation=implementation, tiling=tiling))
