"""Finedeep: naive per-token loop over sub-layers and experts, fresh gates, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax.moe  # noqa: F401  (registers "finedeep")
from sparsejax.registry import FFNS

B, L, D, M, K, F = 2, 3, 8, 2, 3, 12  # F = dense hidden: each expert has F / (M K) = 2 units


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, D)), jnp.float32)


def _make(**kwargs):
  return FFNS.get("finedeep")(**{
      "d_model": D, "d_ff": F, "num_sublayers": M, "experts_per_sublayer": K, **kwargs})


def _random_params(layer, seed):
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), _x())["params"])
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(0.7 * rng.normal(size=shapes[name].shape), jnp.float32)
          for name in sorted(shapes)}


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _naive(x_TD, p, kind):
  """Token by token, sub-layer by sub-layer, expert by expert, in float64."""
  p = {name: np.asarray(value, np.float64) for name, value in p.items()}
  p["norm_MD"] = np.stack([p[f"norm_{m}"] for m in range(M)])
  p["router_MD"] = np.stack([p[f"router_{m}"] for m in range(M)])
  y = np.zeros_like(x_TD, np.float64)
  gates = np.zeros((M, x_TD.shape[0], K))
  for t in range(x_TD.shape[0]):
    u = x_TD[t].astype(np.float64)
    for m in range(M):
      h = u / np.sqrt(np.mean(u * u) + 1e-6) * p["norm_MD"][m]
      outs, scores = [], []
      for k in range(K):
        a = h @ p["wi_MKDF"][m, k]
        a = a * (h @ p["wg_MKDF"][m, k]) / (1 + np.exp(-h @ p["wg_MKDF"][m, k])) \
            if kind == "swiglu" else _gelu(a)
        outs.append(a @ p["wo_MKFD"][m, k])
        scores.append(1 / (1 + np.exp(-outs[-1] @ p["router_MD"][m])))
      gates[m, t] = np.array(scores) / sum(scores)
      s = sum(g * o for g, o in zip(gates[m, t], outs))
      u = u + s
      y[t] += s
  return y, gates


@pytest.mark.parametrize("kind", ["ffn", "swiglu"])
def test_matches_naive_per_token_loop(kind):
  layer = _make(expert=kind)
  params = _random_params(layer, seed=1)
  y, aux = jax.jit(layer.apply)({"params": params}, _x(2))
  expected, gates = _naive(np.asarray(_x(2)).reshape(-1, D), params, kind)
  np.testing.assert_allclose(y.reshape(-1, D), expected, rtol=1e-4, atol=1e-5)
  entropy = np.mean(-np.sum(gates * np.log(gates), axis=-1))
  np.testing.assert_allclose(aux["metrics"]["gate_entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(aux["metrics"]["mean_gate_MK"], gates.mean(axis=1), rtol=1e-5)
  assert aux["losses"] == {}


def test_fresh_layer_averages_its_experts():
  """(The LM plug-in is tests/experiments/test_configs.py's finedeep_lm case.)"""
  (_, aux), variables = jax.jit(_make().init_with_output)(jax.random.PRNGKey(0), _x(1))
  params = nn.unbox(variables["params"])
  assert params["wi_MKDF"].shape == (M, K, D, F // (M * K)) and not np.any(params["router_0"])
  np.testing.assert_allclose(aux["metrics"]["mean_gate_MK"], np.full((M, K), 1 / K), rtol=1e-6)
  np.testing.assert_allclose(aux["metrics"]["gate_entropy"], np.log(K), rtol=1e-6)


def test_errors():
  for kwargs, match in [({"d_ff": 13}, "divisible"), ({"num_sublayers": 0}, "num_sublayers"),
                        ({"expert": "relu"}, "expert")]:
    with pytest.raises(ValueError, match=match):
      _make(**kwargs)
