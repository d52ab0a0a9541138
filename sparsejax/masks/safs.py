"""SAFS: learned per-layer activation functions for sparse networks.

Each hidden layer l runs its own activation

  f_l(x) = α_l · op_l(β_l · x),   op_l ∈ UNARY_OPERATORS,

chosen in two stages: (1) the operators (op_1, ..., op_L) by late-acceptance hill climbing over
short training runs of the sparse network (`lahc_search`, any `score_fn(choice) -> float`,
higher is better); (2) the scales α_l, β_l (initialised to 1) trained by gradient with the
weights (`SAFSMLP(learn_scale=True)`, registered as the model "safs_mlp", so
`--config.classifier.name=safs_mlp --config.classifier.activations='("swish", "tanh")'` trains
it with any sparsity config).

LAHC (Burke & Bykov 2017) keeps a history of H past scores; a neighbour (one layer's operator
replaced) is accepted when its score is >= the current one or >= the score H iterations ago, so
it can step down from local optima early on while converging like hill climbing.

Loni, Mohan, Asadi & Lindauer (2023), "Learning Activation Functions for Sparse Neural Networks"
(SAFS): operator search per layer with LAHC, then the scale factors α, β learned by gradient.
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux, empty_aux
from sparsejax.models.mlp import Linear
from sparsejax.registry import MODELS, Registry

UNARY_OPERATORS: Registry = Registry("SAFS unary operator")


def _hard_sigmoid(z: jax.Array) -> jax.Array:
  return jnp.clip((z + 1.0) / 2.0, 0.0, 1.0)


def _elish(z: jax.Array) -> jax.Array:
  """ELiSH: (e^z − 1) σ(z) for z < 0, z σ(z) otherwise (Basirat & Roth 2018)."""
  return jnp.where(z < 0, jnp.expm1(z), z) * jax.nn.sigmoid(z)


def _hard_elish(z: jax.Array) -> jax.Array:
  """HardELiSH: (e^z − 1) h(z) for z < 0, z h(z) otherwise, h(z) = clip((z + 1) / 2, 0, 1)."""
  return jnp.where(z < 0, jnp.expm1(z), z) * _hard_sigmoid(z)


for _name, _op in {
    "identity": lambda z: z,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "swish": jax.nn.silu,
    "mish": lambda z: z * jnp.tanh(jax.nn.softplus(z)),
    "hardswish": jax.nn.hard_swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "logsigmoid": jax.nn.log_sigmoid,
    "softplus": jax.nn.softplus,
    "sin": jnp.sin,
    "cos": jnp.cos,
    "elish": _elish,
    "hard_elish": _hard_elish,
}.items():
  UNARY_OPERATORS.register(_name)(_op)


def safs_activation(x: jax.Array, op: str, alpha: jax.Array | float = 1.0,
                    beta: jax.Array | float = 1.0) -> jax.Array:
  """α · op(β · x) with `op` a `UNARY_OPERATORS` name."""
  return alpha * UNARY_OPERATORS.get(op)(beta * x)


@MODELS.register("safs_mlp")
class SAFSMLP(nn.Module):
  """An MLP classifier whose hidden layer l uses the activation α_l · op_l(β_l · x).

  h_0 = x_BD;  h_{l+1} = α_l op_l(β_l (h_l W_l + b_l));  logits_BC = h_L W_head + b_head.
  Params are those of `sparsejax.models.MLP` (`layer_l`, `head`) plus scalars `act_l/alpha`,
  `act_l/beta` (init 1; dense under every mask rule) when `learn_scale`; otherwise α = β = 1.
  Loni et al. 2023 (SAFS).

  Attributes:
    num_classes: C.
    hidden: the hidden widths.
    activations: one `UNARY_OPERATORS` name per hidden layer.
    learn_scale: learn α_l, β_l (SAFS stage 2) or keep them at 1 (stage 1).
    dtype: the compute dtype.
  """

  num_classes: int
  hidden: Sequence[int] = (300, 100)
  activations: Sequence[str] = ("relu", "relu")
  learn_scale: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    self._check()
    aux = empty_aux()
    h_BD = x_BD.reshape(x_BD.shape[0], -1).astype(self.dtype)
    for i, (width, op) in enumerate(zip(self.hidden, self.activations)):
      z_BF = Linear(width, "mlp", self.dtype, name=f"layer_{i}")(h_BD)
      alpha, beta = self._scales(i)
      h_BD = safs_activation(z_BF, op, alpha, beta)
      if self.learn_scale:
        aux["metrics"].update({f"act_{i}/alpha": alpha, f"act_{i}/beta": beta})
    return Linear(self.num_classes, "vocab", self.dtype, name="head")(h_BD), aux

  def _scales(self, i: int) -> tuple[jax.Array, jax.Array]:
    if not self.learn_scale:
      return jnp.ones((), self.dtype), jnp.ones((), self.dtype)
    return _Scales(self.dtype, name=f"act_{i}")()

  def _check(self) -> None:
    if len(self.activations) != len(self.hidden):
      raise ValueError(f"SAFSMLP activations={tuple(self.activations)} needs one operator per "
                       f"hidden layer, hidden={tuple(self.hidden)}")
    for op in self.activations:
      UNARY_OPERATORS.get(op)


class _Scales(nn.Module):
  """The scalars α (`alpha`) and β (`beta`) of one layer's activation, initialised to 1."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return (self.param("alpha", nn.initializers.ones, (), self.dtype),
            self.param("beta", nn.initializers.ones, (), self.dtype))


def lahc_accept(candidate: float, current: float, history: float) -> bool:
  """LAHC acceptance when maximising: candidate >= current or candidate >= history."""
  return candidate >= current or candidate >= history


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The best operator tuple found, its score, and every step's (candidate, score, accepted)."""

  best: tuple[str, ...]
  best_score: float
  trace: tuple[tuple[tuple[str, ...], float, bool], ...]


def lahc_search(score_fn: Callable[[tuple[str, ...]], float], initial: Sequence[str],
                steps: int, operators: Sequence[str] | None = None, history: int = 5,
                seed: int = 0) -> SearchResult:
  """SAFS stage 1: late-acceptance hill climbing over per-layer operators.

  Starting from `initial` (e.g. all "relu") with history F_v = f(initial) for v < H: at step i
  a neighbour s' replaces one uniformly drawn layer's operator with a different one from
  `operators` (default: all registered); s' is accepted when `lahc_accept(f(s'), f(s), F_v)`,
  v = i mod H, then F_v = f(s) (the current score after the step). Each distinct tuple is
  scored once. Burke & Bykov 2017; Loni et al. 2023 (SAFS).
  """
  operators = tuple(operators or UNARY_OPERATORS.names())
  for op in tuple(initial) + operators:
    UNARY_OPERATORS.get(op)
  if len(operators) < 2:
    raise ValueError(f"lahc_search needs >= 2 operators to move between, got {operators}")
  if steps < 0 or history < 1:
    raise ValueError(f"lahc_search needs steps >= 0 and history >= 1, got {steps}, {history}")
  rng = np.random.default_rng(seed)
  scores: dict[tuple[str, ...], float] = {}

  def score(choice):
    if choice not in scores:
      scores[choice] = float(score_fn(choice))
    return scores[choice]

  current = tuple(initial)
  best, trace = current, []
  past = [score(current)] * history
  for i in range(steps):
    layer = int(rng.integers(len(current)))
    others = [op for op in operators if op != current[layer]]
    candidate = current[:layer] + (others[int(rng.integers(len(others)))],) + current[layer + 1:]
    accepted = lahc_accept(score(candidate), score(current), past[i % history])
    trace.append((candidate, score(candidate), accepted))
    if accepted:
      current = candidate
      if score(current) > score(best):
        best = current
    past[i % history] = score(current)
  return SearchResult(best=best, best_score=score(best), trace=tuple(trace))
