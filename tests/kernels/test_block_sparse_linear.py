"""BlockSparseLinear: params, logical axes, output against the dense layer, aux, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_schedule import build_block_schedule
from kernels.block_sparse import densify_blocks
from kernels.block_sparse_linear import BlockSparseLinear
from tests.kernels.checks import assert_close

MASK = np.array([[1, 0, 1],
                 [0, 0, 1]], bool)  # Z = 3 of 6 blocks; column 1 has no block
BLOCK = (4, 8)


def _init(layer, x):
  return layer.init(jax.random.key(0), x)


def test_params_have_the_stored_blocks_and_logical_axes():
  layer = BlockSparseLinear(block_mask=MASK, block_shape=BLOCK)
  variables = _init(layer, jnp.ones((2, 8)))
  assert jax.tree.map(jnp.shape, nn.unbox(variables)) == {
      "params": {"blocks": (3, 4, 8), "bias": (24,)}}
  assert nn.get_partition_spec(variables) == {
      "params": {"blocks": jax.sharding.PartitionSpec(None, "embed", "mlp"),
                 "bias": jax.sharding.PartitionSpec("mlp")}}


def test_matches_dense_layer_and_reports_density():
  layer = BlockSparseLinear(block_mask=MASK, block_shape=BLOCK,
                            bias_init=nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  variables = _init(layer, x)
  y, aux = jax.jit(layer.apply)(variables, x)
  params = nn.unbox(variables)["params"]
  w_KN = densify_blocks(params["blocks"], build_block_schedule(MASK))
  assert_close(y, x @ w_KN + params["bias"])
  assert y.shape == (2, 5, 24)
  assert aux == {"losses": {}, "metrics": {"density": pytest.approx(0.5)}}
  assert np.all(np.asarray(y)[..., 8:16] == np.asarray(params["bias"])[8:16])


def test_gradients_flow_to_blocks_and_input():
  layer = BlockSparseLinear(block_mask=MASK, block_shape=BLOCK, use_bias=False)
  x = jax.random.normal(jax.random.key(2), (6, 8))
  variables = _init(layer, x)
  grads = jax.grad(lambda v, x: jnp.sum(layer.apply(v, x)[0] ** 2), argnums=(0, 1))(variables, x)
  assert nn.unbox(grads[0])["params"]["blocks"].shape == (3, 4, 8)
  assert grads[1].shape == x.shape and np.all(np.isfinite(np.asarray(grads[1])))


def test_default_init_has_variance_one_over_mean_fan_in():
  mask = np.ones((16, 4), bool)
  mask[8:, :2] = False  # Z = 48 of 64 blocks: mean fan-in Z bk / C = 48 * 8 / 4 = 96
  layer = BlockSparseLinear(block_mask=mask, block_shape=(8, 8))
  blocks = nn.unbox(_init(layer, jnp.ones((1, 128))))["params"]["blocks"]
  assert float(jnp.var(blocks)) == pytest.approx(1 / 96, rel=0.1)


def test_bfloat16_compute():
  layer = BlockSparseLinear(block_mask=MASK, block_shape=BLOCK, dtype=jnp.bfloat16)
  y, _ = layer.apply(_init(layer, jnp.ones((3, 8))), jnp.ones((3, 8)))
  assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("layer,x,match", [
    (BlockSparseLinear(block_mask=MASK, block_shape=BLOCK), jnp.ones((2, 9)),
     r"x's last dim must be R bk = 2 x 4 = 8, got shape \(2, 9\)"),
    (BlockSparseLinear(block_mask=MASK, block_shape=(4,)), jnp.ones((2, 8)),
     r"block_shape must be two positive ints"),
    (BlockSparseLinear(block_mask=MASK.astype(int), block_shape=BLOCK), jnp.ones((2, 8)),
     r"block mask must be a non-empty 2-D bool array"),
])
def test_bad_configuration_is_a_clear_error(layer, x, match):
  with pytest.raises(ValueError, match=match):
    _init(layer, x)
