"""MoE over NHWC feature maps: equals the MoE on reshaped tokens and a per-position loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "conv_moe")
from sparsejax.registry import FFNS
from tests.moe import reference

B, H, W, C, F, E = 2, 3, 2, 4, 8, 4


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, H, W, C)), jnp.float32)


def _kwargs(**extra):
  return {"d_model": C, "d_ff": F, "num_experts": E, "k": 2, "expert": "ffn", "tile": 4,
          **extra}


def test_equals_moe_on_tokens_and_per_position_loop():
  layer = FFNS.get("conv_moe")(**_kwargs())
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), _x()))["params"]
  rng = np.random.default_rng(1)
  params = {name: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32)
            for name, s in shapes.items()}
  x = _x(2)
  y, aux = jax.jit(layer.apply)({"params": params}, x)
  assert y.shape == (B, H, W, C)

  tokens_y, tokens_aux = jax.jit(FFNS.get("moe")(**_kwargs()).apply)(
      {"params": params}, x.reshape(B, H * W, C))
  np.testing.assert_allclose(y, tokens_y.reshape(B, H, W, C), rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), aux, tokens_aux)

  expected = np.zeros((B, H, W, C))
  logits = np.asarray(x, np.float64).reshape(-1, C) @ np.asarray(params["router_DE"], np.float64)
  experts, gates = reference.top_k(logits, 2)
  for t, (b, h, w) in enumerate(np.ndindex(B, H, W)):
    for e, g in zip(experts[t], gates[t]):
      expected[b, h, w] += g * np.asarray(reference.ffn(x[b, h, w][None], params, e, "ffn"))[0]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  load = np.bincount(experts.ravel(), minlength=E) / experts.size
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"], load, rtol=1e-6)


@pytest.mark.parametrize("shape", [(B, H * W, C), (B, H, W, C + 1), (H, W, C)])
def test_rejects_inputs_that_are_not_4d_maps_with_c_channels(shape):
  layer = FFNS.get("conv_moe")(**_kwargs())
  with pytest.raises(ValueError, match="4-D"):
    jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros(shape))
