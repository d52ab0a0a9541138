"""Implementation choice per platform, its errors, and interpret mode's NaN fill."""
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import backend
from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import block_sparse_matmul
from kernels.gmm import gmm, tgmm


@pytest.mark.parametrize("platform,expected", [
    ("cpu", backend.Backend("xla")),
    ("tpu", backend.Backend("pallas", "tpu")),
    ("gpu", backend.Backend("pallas", "gpu")),
])
def test_auto_picks_pallas_on_accelerators_and_xla_on_cpu(platform, expected):
  assert backend.resolve_backend("auto", platform=platform) == expected


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("platform", ["cpu", "tpu", "gpu"])
def test_xla_and_reference_run_everywhere(implementation, platform):
  assert backend.resolve_backend(implementation, platform=platform).kind == implementation


def test_pallas_on_cpu_needs_interpret():
  with pytest.raises(ValueError, match=r"^implementation='pallas' needs a TPU or GPU, or "
                     r"interpret=True; on 'cpu' use one of 'auto', 'xla', 'reference'$"):
    backend.resolve_backend("pallas", platform="cpu")
  assert backend.resolve_backend("pallas", True, "cpu") == backend.Backend("pallas", "tpu", True)
  assert backend.resolve_backend("pallas", True, "gpu") == backend.Backend("pallas", "gpu", True)


def test_unknown_implementation_names_value_and_allowed():
  with pytest.raises(ValueError, match=r"^implementation='triton' is not one of 'auto', "
                     r"'pallas', 'xla', 'reference'$"):
    backend.resolve_backend("triton")


def test_kernels_reject_pallas_on_cpu_without_interpret():
  lhs, sizes = jnp.ones((4, 3)), jnp.array([4], jnp.int32)
  schedule = build_block_schedule(np.ones((1, 1), bool))
  for call in (lambda: gmm(lhs, jnp.ones((1, 3, 2)), sizes, implementation="pallas"),
               lambda: tgmm(lhs, jnp.ones((4, 2)), sizes, implementation="pallas"),
               lambda: block_sparse_matmul(lhs, jnp.ones((1, 3, 2)), schedule,
                                           implementation="pallas")):
    with pytest.raises(ValueError, match="implementation='pallas' needs"):
      call()


@pytest.mark.parametrize("prefetch", [False, True])
def test_interpret_mode_fills_unwritten_outputs_with_nan(prefetch):
  """What makes the kernel tests' finiteness checks meaningful, for plain grids (the GPU
  kernels) and scalar-prefetch grids (the TPU kernels)."""

  def write_first_block(*refs):
    x_ref, o_ref = refs[-2:]

    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  specs = dict(grid=(2,), in_specs=[pl.BlockSpec((8, 8), lambda i, *_: (i, 0))],
               out_specs=pl.BlockSpec((8, 8), lambda i, *_: (i, 0)))
  args = (jnp.ones((16, 8)),)
  if prefetch:
    specs = dict(grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, **specs))
    args = (jnp.zeros(1, jnp.int32),) + args
  out = pl.pallas_call(write_first_block, out_shape=jax.ShapeDtypeStruct((16, 8), jnp.float32),
                       interpret=True, **specs)(*args)
  assert np.all(np.asarray(out[:8]) == 1)
  assert np.all(np.isnan(np.asarray(out[8:])))
