"""SAFS: the unary operators, the per-layer-activation MLP and the LAHC operator search."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks
from sparsejax import models
from sparsejax.masks import safs


def _sig(z):
  return 1 / (1 + math.exp(-z))


def _softplus(z):
  return math.log1p(math.exp(z))


_SELU_A, _SELU_L = 1.6732632423543772, 1.0507009873554805
REFERENCE = {
    "identity": lambda z: z,
    "relu": lambda z: max(z, 0.0),
    "relu6": lambda z: min(max(z, 0.0), 6.0),
    "elu": lambda z: z if z > 0 else math.exp(z) - 1,
    "selu": lambda z: _SELU_L * (z if z > 0 else _SELU_A * (math.exp(z) - 1)),
    "gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),
    "swish": lambda z: z * _sig(z),
    "mish": lambda z: z * math.tanh(_softplus(z)),
    "hardswish": lambda z: z * min(max(z + 3, 0.0), 6.0) / 6,
    "tanh": math.tanh,
    "sigmoid": _sig,
    "logsigmoid": lambda z: -_softplus(-z),
    "softplus": _softplus,
    "sin": math.sin,
    "cos": math.cos,
    "elish": lambda z: (math.exp(z) - 1 if z < 0 else z) * _sig(z),
    "hard_elish": lambda z: (math.exp(z) - 1 if z < 0 else z) * min(max((z + 1) / 2, 0.0), 1.0),
}


def test_every_operator_matches_its_formula_with_scales():
  assert safs.UNARY_OPERATORS.names() == sorted(REFERENCE)
  xs = [-2.5, -0.6, 0.0, 0.4, 1.7, 9.0]
  alpha, beta = 1.5, 0.8
  every = jax.jit(lambda x: {name: safs.safs_activation(x, name, alpha, beta)
                             for name in REFERENCE})(jnp.asarray(xs, jnp.float32))
  for name, ref in REFERENCE.items():
    got = every[name]
    np.testing.assert_allclose(got, [alpha * ref(beta * v) for v in xs], rtol=2e-5, atol=1e-6,
                               err_msg=name)


def test_safs_mlp_matches_a_numpy_forward():
  model = safs.SAFSMLP(num_classes=2, hidden=(3, 2), activations=("sin", "elish"))
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x))["params"])
  params = jax.tree.map(np.asarray, params)
  params["act_0"] = {"alpha": np.float32(0.5), "beta": np.float32(2.0)}
  params["act_1"] = {"alpha": np.float32(-1.0), "beta": np.float32(0.3)}
  logits, aux = jax.jit(model.apply)({"params": params}, jnp.asarray(x))

  def dense(name, h):
    return h @ params[name]["kernel"] + params[name]["bias"]

  h = 0.5 * np.sin(2.0 * dense("layer_0", x))
  z = 0.3 * dense("layer_1", h)
  h = -1.0 * np.where(z < 0, np.expm1(z), z) / (1 + np.exp(-z))
  np.testing.assert_allclose(logits, dense("head", h), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["metrics"]["act_1/alpha"], -1.0)
  # the scales are scalars: never sparsified by the default mask rules
  structures = masks.leaf_structures(params)
  assert structures["act_0/alpha"][0] == "dense" and structures["layer_0/kernel"][0] != "dense"


def test_safs_mlp_is_a_registered_classifier_and_checks_its_arguments():
  model = models.build_classifier({"name": "safs_mlp", "activations": ("swish", "tanh"),
                                   "learn_scale": False}, num_classes=10)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
  assert sorted(params) == ["head", "layer_0", "layer_1"]
  with pytest.raises(ValueError, match="one operator per hidden layer"):
    safs.SAFSMLP(num_classes=2, hidden=(3,), activations=("relu", "relu")).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match="unknown SAFS unary operator 'swishy'"):
    safs.safs_activation(jnp.zeros(2), "swishy")


def test_lahc_accept_hand_worked():
  assert safs.lahc_accept(0.5, 0.5, 0.9)       # ties the current score
  assert safs.lahc_accept(0.4, 0.5, 0.3)       # worse than current, better than H steps ago
  assert not safs.lahc_accept(0.4, 0.5, 0.45)  # worse than both


def test_lahc_search_follows_the_rule_and_finds_a_separable_optimum():
  ops = ("relu", "tanh", "sin", "swish")
  gain = {"relu": 0.0, "tanh": 1.0, "sin": 0.3, "swish": 0.6}
  weights = (1.0, 2.0, 0.5)
  calls = []

  def score(choice):
    calls.append(choice)
    return sum(w * gain[op] for w, op in zip(weights, choice))

  history = 3
  result = safs.lahc_search(score, ("relu",) * 3, steps=60, operators=ops, history=history,
                            seed=0)
  assert result.best == ("tanh",) * 3 and result.best_score == pytest.approx(3.5)
  assert len(calls) == len(set(calls))  # each tuple scored once
  # replay the trace with an independent LAHC bookkeeping
  current, past = ("relu",) * 3, [0.0] * history
  for i, (candidate, cand_score, accepted) in enumerate(result.trace):
    assert sum(a != b for a, b in zip(candidate, current)) == 1
    assert cand_score == pytest.approx(score(candidate))
    expected = cand_score >= score(current) or cand_score >= past[i % history]
    assert accepted == expected
    current = candidate if accepted else current
    past[i % history] = score(current)
  with pytest.raises(ValueError, match=">= 2 operators"):
    safs.lahc_search(score, ("relu",), steps=1, operators=("relu",))
