"""Soft MoE against a naive per-group numpy loop; grouping, causality and errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "soft_moe")
from sparsejax.moe import soft
from sparsejax.registry import FFNS
from tests.moe import reference

B, L, D, F, E, P = 2, 6, 8, 16, 3, 2


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))


def _make(**kwargs):
  return FFNS.get("soft_moe")(d_model=D, d_ff=F, num_experts=E, slots_per_expert=P, name="ffn",
                              **kwargs)


def _ffn_numpy(x, weights, e, kind):
  """Expert e's FFN in float64 numpy (tanh GELU as jax.nn.gelu, SiLU)."""
  h = x @ weights["wi_EDF"][e]
  if kind == "swiglu":
    g = x @ weights["wg_EDF"][e]
    h = g / (1 + np.exp(-g)) * h
  else:
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return h @ weights["wo_EFD"][e]


def _naive_soft_moe(x_BTD, params, group, kind):
  """Each group on its own: normalised logits, the two softmaxes, experts slot by slot."""
  x = np.asarray(x_BTD, np.float64).reshape(-1, group, D)
  phi = np.asarray(params["phi_DS"], np.float64)
  phi = phi / np.linalg.norm(phi, axis=0, keepdims=True)
  weights = {k: np.asarray(v, np.float64) for k, v in params.items() if k.endswith(("EDF", "EFD"))}
  out = np.zeros_like(x)
  for g in range(x.shape[0]):
    xn = x[g] / np.linalg.norm(x[g], axis=1, keepdims=True)
    logits = float(params["scale"]) * xn @ phi
    dispatch = reference.softmax(logits.T).T
    combine = reference.softmax(logits)
    slots = dispatch.T @ x[g]
    expert_out = np.stack([_ffn_numpy(slots[s], weights, s // P, kind) for s in range(E * P)])
    out[g] = combine @ expert_out
  return out.reshape(x_BTD.shape)


@pytest.mark.parametrize("group,kind", [(None, "swiglu"), (3, "ffn"), (1, "ffn")])
def test_matches_naive_per_group_loop(group, kind):
  layer = _make(causal=False, token_group_size=group, expert=kind)
  variables = layer.init(jax.random.PRNGKey(0), _x())
  params = nn.unbox(variables["params"])
  params["scale"] = jnp.asarray(2.5)
  y, aux = jax.jit(layer.apply)({"params": params}, _x(1))
  expected = _naive_soft_moe(_x(1), params, L if group is None else group, kind)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  assert aux["losses"] == {} and set(aux["metrics"]) == {"dispatch_entropy", "combine_entropy"}


def test_weights_are_softmaxes_over_tokens_and_over_slots():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, D))
  phi = jax.random.normal(jax.random.PRNGKey(1), (D, 6))
  dispatch, combine = soft.soft_weights(x, phi, jnp.asarray(3.0))
  np.testing.assert_allclose(jnp.sum(dispatch, axis=1), np.ones((4, 6)), rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(combine, axis=2), np.ones((4, 5)), rtol=1e-6)


def test_per_token_groups_are_causal_and_groups_do_not_mix():
  for causal, group in [(True, 1), (False, 3)]:
    layer = _make(causal=causal, token_group_size=group)
    variables = layer.init(jax.random.PRNGKey(0), _x())
    apply = jax.jit(layer.apply)
    x = _x(2)
    changed = x.at[:, 3:].set(_x(3)[:, 3:])
    y, y_changed = apply(variables, x)[0], apply(variables, changed)[0]
    np.testing.assert_allclose(y[:, :3], y_changed[:, :3], rtol=1e-6)
    assert not np.allclose(y[:, 3:], y_changed[:, 3:])


@pytest.mark.parametrize("kwargs,message", [
    ({}, "causal=True needs token_group_size=1 .* got token_group_size=None"),
    ({"token_group_size": 2}, "causal=True needs token_group_size=1"),
    ({"causal": False, "token_group_size": 4}, "divide the length 6, got 4"),
    ({"causal": False, "expert": "relu"}, "expert must be one of"),
])
def test_bad_config_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _make(**kwargs).init(jax.random.PRNGKey(0), _x())
