"""Which implementation of a kernel runs: `implementation="auto" | "pallas" | "xla" | "reference"`.

Every kernel in this package has a dense jnp reference, a Pallas kernel (TPU Mosaic and GPU
Triton flavours) and an XLA implementation for CPU. `resolve_backend` turns the user's choice
into the one that runs:

  "auto"      -> the Pallas kernel on TPU and GPU, the XLA implementation elsewhere;
  "pallas"    -> the Pallas kernel of the platform, or, with `interpret=True`, the kernel run by
                 the Pallas interpreter (the TPU flavour on CPU): the way CPU tests run kernels;
  "xla"       -> the XLA implementation, on any platform;
  "reference" -> the dense jnp reference (differentiated by JAX itself), on any platform.

An explicit choice the platform lacks ("pallas" on CPU without `interpret=True`) is a one-line
ValueError naming the value and what is allowed.

`interpret=True` uses Pallas' generic interpreter, which fills every output element the kernel
never wrote with NaN, so tests that check outputs are finite catch a missed block. The TPU
simulator (`with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):`) models VMEM
buffers and pipelining more faithfully, but reuses an output buffer from block to block, so
there a missed block shows the previous block's values rather than NaN.
"""
from typing import NamedTuple

import jax

IMPLEMENTATIONS = ("auto", "pallas", "xla", "reference")
PALLAS_PLATFORMS = ("tpu", "gpu")


class Backend(NamedTuple):
  """A resolved implementation: `kind` in ("pallas", "xla", "reference").

  For "pallas", `platform` is the kernel flavour ("tpu" or "gpu") and `interpret` whether the
  Pallas interpreter runs it; both are unused otherwise. Hashable, so it can be a static argument.
  """
  kind: str
  platform: str = "tpu"
  interpret: bool = False


def resolve_backend(implementation: str, interpret: bool = False,
                    platform: str | None = None) -> Backend:
  """The backend that runs `implementation` on `platform` (default: JAX's default backend)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of "
                     f"{', '.join(map(repr, IMPLEMENTATIONS))}")
  platform = jax.default_backend() if platform is None else platform
  has_pallas = platform in PALLAS_PLATFORMS
  if implementation == "auto":
    implementation = "pallas" if has_pallas else "xla"
  if implementation == "pallas" and not (has_pallas or interpret):
    raise ValueError(f"implementation='pallas' needs a TPU or GPU, or interpret=True; on "
                     f"{platform!r} use one of 'auto', 'xla', 'reference'")
  flavour = platform if has_pallas else "tpu"
  return Backend(implementation, flavour, bool(interpret))
