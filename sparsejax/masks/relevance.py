"""Relevance-selective weight decay: a growing L2 penalty on the least relevant weights only,
driving them to zero before they are pruned (regularisation-based pruning, GReg-1).

  tx = optax.chain(relevance_decay(sparsity=0.9, lam_step=1e-4, every=10, lam_max=1.0),
                   optax.adam(1e-3))                       # the optax transform, or as updater:
  config.sparsity.updater = {"name": "greg", "sparsity": 0.9, "lam_step": 1e-4, ...}
  config.sparsity.schedule = {"name": "one_shot", "sparsity": 0.9, "at": 2000}
"""
import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.masks.mask import map_with_key_paths, path_str
from sparsejax.masks.updaters import (Magnitude, _check_structures, _like_grads, _masked,
                                      _round_count, grow_highest, leaf_inputs)
from sparsejax.registry import UPDATERS

PyTree = Any

RELEVANCES = ("magnitude", "taylor")


def relevance(w: jax.Array, g: jax.Array | None, kind: str) -> jax.Array:
  """Per-weight relevance: |w| ("magnitude") or |w ⊙ g| ("taylor", the first-order loss change
  of removing w; Molchanov et al. (2019), "Importance Estimation for Neural Network Pruning")."""
  if kind == "magnitude":
    return jnp.abs(w).astype(jnp.float32)
  if kind == "taylor":
    return jnp.abs(w * g).astype(jnp.float32)
  raise ValueError(f"relevance must be one of {RELEVANCES}, got {kind!r}")


def growing_lambda(step, lam_step: float, every: int, lam_max: float) -> jax.Array:
  """λ_t = min(λ_max, δλ ⌊t / K⌋): the GReg-1 penalty grows by δλ every K steps."""
  t = jnp.asarray(step, jnp.int32)
  return jnp.minimum(lam_max, lam_step * (t // every).astype(jnp.float32))


def greg_grad(w: jax.Array, score: jax.Array, sparsity, lam) -> jax.Array:
  """λ · 1[w among the round(s · n) lowest scores] ⊙ w: ∂/∂w of (λ/2) Σ_{i∈P} w_i².

  P = the round(s · n) entries with the lowest `score` (ties: lower flat index first).
  Wang, Qin, Zhang & Fu (2021), "Neural Pruning via Growing Regularization" (GReg-1).
  """
  selected = grow_highest(-score, jnp.ones(score.shape, jnp.bool_), _round_count(sparsity, w.size))
  return (lam * jnp.where(selected, w, 0.0)).astype(w.dtype)


def _check(sparsity: float, lam_step: float, every: int, lam_max: float, kind: str) -> None:
  if not 0 <= sparsity < 1:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  if lam_step < 0 or lam_max < 0:
    raise ValueError(f"lam_step and lam_max must be >= 0, got {lam_step}, {lam_max}")
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  relevance(jnp.zeros(()), jnp.zeros(()), kind)


class RelevanceDecayState(NamedTuple):
  """State of `relevance_decay`: the step."""

  step: jax.Array


def relevance_decay(sparsity: float, lam_step: float, every: int, lam_max: float,
                    relevance_kind: str = "magnitude",
                    path_rule: str = "kernel") -> optax.GradientTransformation:
  """Adds `greg_grad` to the updates (gradients) of the leaves whose path matches `path_rule`.

  u_i = g_i + λ_t 1[i ∈ P_t] w_i, with P_t the `sparsity` fraction of each leaf's weights of
  lowest relevance at step t (re-ranked every step; GReg-1 fixes P at the start, which a
  growing λ makes equivalent once the penalised weights have shrunk) and λ_t `growing_lambda`.
  Chain it before the optimizer. Wang et al. (2021), "Neural Pruning via Growing
  Regularization".
  """
  _check(sparsity, lam_step, every, lam_max, relevance_kind)

  def init_fn(params):
    del params
    return RelevanceDecayState(step=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("relevance_decay needs params: tx.update(grads, state, params)")
    lam = growing_lambda(state.step, lam_step, every, lam_max)
    hits = map_with_key_paths(lambda kp, _: bool(re.search(path_rule, path_str(kp))), params)

    def penalised(g, w, hit):
      if not hit:
        return g
      return g + greg_grad(w, relevance(w, g, relevance_kind), sparsity, lam).astype(g.dtype)

    return (jax.tree.map(penalised, updates, params, hits),
            RelevanceDecayState(step=state.step + 1))

  return optax.GradientTransformation(init_fn, update_fn)


@UPDATERS.register("greg")
@dataclasses.dataclass(frozen=True)
class GReg(Magnitude):
  """GReg-1 then magnitude pruning: on sparse (unstructured) leaves the gradient is
  g + `greg_grad`(w, relevance, sparsity, λ_t) with masked-out weights ranked lowest (so P
  holds the `sparsity` fraction of the leaf, the pruned ones included); the schedule's steps
  prune by magnitude (`Magnitude`), e.g. `one_shot` once λ has reached λ_max.
  Wang et al. (2021), "Neural Pruning via Growing Regularization".
  """

  sparsity: float = 0.9
  lam_step: float = 1e-4
  every: int = 10
  lam_max: float = 1.0
  relevance: str = "magnitude"

  def check(self, mask):
    super().check(mask)
    _check(self.sparsity, self.lam_step, self.every, self.lam_max, self.relevance)
    _check_structures(mask, ("unstructured",), "GReg")

  def grads(self, inputs):
    lam = growing_lambda(inputs.step, self.lam_step, self.every, self.lam_max)

    def penalised(leaf):
      if not leaf.sparse:
        return leaf.g
      score = jnp.where(leaf.m, relevance(leaf.w, leaf.g, self.relevance), -jnp.inf)
      return leaf.g + greg_grad(leaf.w, score, self.sparsity, lam).astype(leaf.g.dtype)

    return _like_grads(inputs, [_masked(penalised(leaf), leaf.m) for leaf in leaf_inputs(inputs)])
