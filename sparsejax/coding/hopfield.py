"""Sparse modern Hopfield retrieval: xi <- X^T alpha-entmax(beta X xi), iterated.

For stored patterns X_MD (rows) and a query xi_D, one update is
  p = alpha-entmax(beta X xi),  xi_new = X^T p.
alpha = 1 is softmax (the modern Hopfield network / attention, Ramsauer et al. 2020); alpha > 1
gives exactly-zero weights, so a query retrieves from a few patterns and well-separated patterns
are retrieved exactly in one step (Hu et al. 2023). The normalisers are `sparsejax.ops`'.
Shape letters: Q queries, M stored patterns.
Ramsauer et al. 2020, "Hopfield Networks is All You Need"; Hu et al. 2023, "On Sparse Modern
Hopfield Model"; Wu et al. 2024, "STanHop: Sparse Tandem Hopfield Model for Memory-Enhanced Time
Series Prediction" (learnable alpha).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.models.layers import logical_param
from sparsejax.ops import entmax15, entmax_bisect, sparsemax


def entmax_weights(scores_QM: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """alpha-entmax over the last axis: softmax (alpha = 1), 1.5-entmax, sparsemax (alpha = 2), or
  bisection for any other alpha > 1 (an array alpha, e.g. a learned one, always bisects)."""
  if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
    if alpha < 1:
      raise ValueError(f"alpha={alpha!r}; allowed: a float >= 1")
    exact = {1: jax.nn.softmax, 1.5: entmax15, 2: sparsemax}.get(alpha)
    if exact is not None:
      return exact(scores_QM, axis=-1)
  return entmax_bisect(scores_QM, alpha, axis=-1)


def hopfield_retrieve(xi_QD: jax.Array, memories_MD: jax.Array, beta: float | jax.Array,
                      alpha: float | jax.Array = 2.0,
                      num_steps: int = 1) -> tuple[jax.Array, jax.Array]:
  """(xi_QD, p_QM) after `num_steps` updates xi <- p X, p = alpha-entmax(beta xi X^T).

  xi_QD [..., Q, D] and memories_MD [..., M, D] broadcast in their leading dims (one shared
  [M, D] memory for a batch of queries, or one memory per example). p_QM are the weights of the
  last update. Hu et al. 2023, "On Sparse Modern Hopfield Model" (Ramsauer et al. 2020 for
  alpha = 1).
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}; allowed: a positive int")
  if memories_MD.ndim < 2 or xi_QD.ndim < 2 or xi_QD.shape[-1] != memories_MD.shape[-1]:
    raise ValueError(f"xi_QD {xi_QD.shape} and memories_MD {memories_MD.shape} must be "
                     "[..., Q, D] and [..., M, D]")
  memories_DM = jnp.swapaxes(memories_MD, -1, -2)

  def update(xi):
    p_QM = entmax_weights(beta * (xi @ memories_DM), alpha)
    return p_QM @ memories_MD, p_QM

  for _ in range(num_steps):  # unrolled: num_steps is small (1 to 3 in the papers)
    xi_QD, p_QM = update(xi_QD)
  return xi_QD, p_QM


class SparseHopfield(nn.Module):
  """Queries retrieve from stored patterns by `hopfield_retrieve`, with a learnable alpha.

  Patterns are the `memories_MD` passed to the call (e.g. a context window), or else a learned
  memory param "memory" [num_memories, D] ("memory", "embed"; normal init). beta defaults to
  1 / sqrt(D). With `learn_alpha`, alpha = 1 + sigmoid(a) in (1, 2), param "alpha_logit" starting
  at `alpha` (Correia et al. 2019's parametrisation); otherwise `alpha` is fixed (1 = softmax).
  Call: `(xi_QD, memories_MD=None, *, deterministic=True) -> (y_QD, aux)`, aux metrics
  "attended_fraction" (the mean fraction of patterns with nonzero weight) and "alpha".
  Wu et al. 2024, "STanHop" (learnable-alpha sparse Hopfield layer); Hu et al. 2023.
  """

  num_memories: int | None = None
  alpha: float = 1.5
  learn_alpha: bool = True
  beta: float | None = None
  num_steps: int = 1

  @nn.compact
  def __call__(self, xi_QD: jax.Array, memories_MD: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No randomness.
    alpha = self._alpha()
    if memories_MD is None:
      if not isinstance(self.num_memories, int) or self.num_memories < 1:
        raise ValueError(f"num_memories={self.num_memories!r}; allowed: a positive int when "
                         "the call passes no memories_MD")
      memories_MD = logical_param(
          self, "memory", nn.initializers.normal(1.0), (self.num_memories, xi_QD.shape[-1]),
          ("memory", "embed"), xi_QD.dtype)
    beta = 1 / math.sqrt(xi_QD.shape[-1]) if self.beta is None else self.beta
    y_QD, p_QM = hopfield_retrieve(xi_QD, memories_MD, beta, alpha, self.num_steps)
    metrics = {"attended_fraction": jnp.mean((p_QM > 0).astype(jnp.float32)),
               "alpha": jnp.asarray(alpha, jnp.float32)}
    return y_QD, {"losses": {}, "metrics": metrics}

  def _alpha(self) -> float | jax.Array:
    """alpha: fixed, or 1 + sigmoid(alpha_logit) when learned."""
    if not self.learn_alpha:
      return self.alpha
    if not 1 < self.alpha < 2:
      raise ValueError(f"alpha={self.alpha!r}; allowed with learn_alpha: a float in (1, 2)")
    start = float(np.log((self.alpha - 1) / (2 - self.alpha)))
    logit = self.param("alpha_logit", nn.initializers.constant(start), (), jnp.float32)
    return 1 + jax.nn.sigmoid(logit)
