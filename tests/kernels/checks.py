"""Comparison of kernel outputs with their references, shared by the kernel tests."""
import jax.numpy as jnp
import numpy as np

# Largest |actual - expected| allowed, relative to max |expected|.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def assert_close(actual, expected, what: str = "output"):
  """actual is finite everywhere and within TOLERANCE[dtype] of expected, relative to its max.

  Pallas interpret mode fills memory a kernel never wrote with NaN, so the finiteness check
  catches a missed output block.
  """
  tolerance = TOLERANCE[jnp.dtype(actual.dtype)]
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite entries (an unwritten block?)"
  scale = float(np.max(np.abs(expected), initial=0.0))
  error = float(np.max(np.abs(actual - expected), initial=0.0))
  assert error <= tolerance * scale, (
      f"{what}: max error {error:.3g} > {tolerance} x max |expected| {scale:.3g}")
