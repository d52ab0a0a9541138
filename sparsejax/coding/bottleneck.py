"""Top-k bottlenecks: keep the k largest units of each row, with a straight-through or a Gumbel
top-k (relaxed) backward pass.

Both keep z = m ⊙ x in the forward pass, m the hard top-k mask of the row (k ones); they differ in
how m is chosen and in the gradient they pass back:
  "straight_through"  m = top-k of x; dL/dx = dL/dz (identity: every unit gets its gradient, kept
                      or not; Bengio et al. 2013's straight-through estimator).
  "gumbel"            m = top-k of x + G, G i.i.d. Gumbel(0, 1) (a sample of k units without
                      replacement from softmax(x), Kool et al. 2019); the backward pass treats m as
                      the relaxed top-k mask of x + G at a temperature (Xie & Ermon 2019).
Koh et al. 2020, "Concept Bottleneck Models" (the bottleneck these make sparse).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux

MODES = ("straight_through", "gumbel")


def check_k(k: int, num_units: int) -> None:
  """A ValueError unless k is an int in [1, num_units]."""
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_units:
    raise ValueError(f"k={k!r}; allowed: an int in [1, {num_units}] (the last axis)")


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}; allowed: a float > 0")


def indices_to_mask(idx_BK: jax.Array, num_units: int, dtype=jnp.float32) -> jax.Array:
  """mask_BN with 1 at the K indices of each row and 0 elsewhere (a scatter: no [B, K, N])."""
  rows_RK = idx_BK.reshape(-1, idx_BK.shape[-1])
  row_R1 = jnp.arange(rows_RK.shape[0])[:, None]
  mask_RN = jnp.zeros((rows_RK.shape[0], num_units), dtype).at[row_R1, rows_RK].set(1)
  return mask_RN.reshape(idx_BK.shape[:-1] + (num_units,))


def top_k_mask(scores_BN: jax.Array, k: int) -> jax.Array:
  """mask_BN: 1 at the k largest scores of each row (ties as `lax.top_k` breaks them), else 0."""
  check_k(k, scores_BN.shape[-1])
  _, idx_BK = jax.lax.top_k(scores_BN, k)
  return indices_to_mask(idx_BK, scores_BN.shape[-1], scores_BN.dtype)


def straight_through_top_k(x_BN: jax.Array, k: int) -> jax.Array:
  """z = m ⊙ x, m = top_k_mask(x, k), with dL/dx = dL/dz (the identity straight-through).

  Bengio, Léonard & Courville 2013, "Estimating or Propagating Gradients Through Stochastic
  Neurons" (straight-through estimator).
  """
  masked_BN = jax.lax.stop_gradient(top_k_mask(x_BN, k)) * x_BN
  return x_BN + jax.lax.stop_gradient(masked_BN - x_BN)


def relaxed_top_k_mask(scores_BN: jax.Array, k: int, temperature: float) -> jax.Array:
  """A soft k-hot mask of the scores s at temperature t: the sum of k successive softmaxes.

  r = sum_{j<k} p_j, p_j = softmax(a_j / t), a_0 = s, a_{j+1} = a_j + log(1 - p_j). Each row of r
  sums to k; it tends to the hard top-k mask as t -> 0.
  Xie & Ermon 2019, "Reparameterizable Subset Sampling via Continuous Relaxations".
  """
  check_k(k, scores_BN.shape[-1])
  _check_temperature(temperature)
  tiny = jnp.finfo(jnp.result_type(scores_BN, float)).tiny

  def pick(_, carry):
    logits_BN, mask_BN = carry
    p_BN = jax.nn.softmax(logits_BN / temperature, axis=-1)
    return logits_BN + jnp.log(jnp.maximum(1 - p_BN, tiny)), mask_BN + p_BN

  _, mask_BN = jax.lax.fori_loop(0, k, pick, (scores_BN, jnp.zeros_like(scores_BN)))
  return mask_BN


def gumbel_top_k(x_BN: jax.Array, k: int, temperature: float,
                 key: jax.Array | None = None) -> jax.Array:
  """z = m ⊙ x with m the top-k mask of x + G, G ~ Gumbel(0, 1) i.i.d. drawn from `key`.

  The k kept units are a sample without replacement from softmax(x) (Plackett-Luce). Backward:
  m acts as m_hard + r - stop_gradient(r), r = relaxed_top_k_mask(x + G, k, temperature), so
  dz_i/dx_j = m_i [i = j] + x_i dr_i/dx_j. `key=None` means G = 0 (evaluation).
  Kool, van Hoof & Welling 2019, "Stochastic Beams and Where to Find Them" (Gumbel top-k);
  Xie & Ermon 2019, "Reparameterizable Subset Sampling via Continuous Relaxations".
  """
  check_k(k, x_BN.shape[-1])
  _check_temperature(temperature)
  scores_BN = x_BN
  if key is not None:
    scores_BN = x_BN + jax.random.gumbel(key, x_BN.shape, jnp.result_type(x_BN, float))
  hard_BN = jax.lax.stop_gradient(top_k_mask(scores_BN, k))
  relaxed_BN = relaxed_top_k_mask(scores_BN, k, temperature)
  return x_BN * (hard_BN + (relaxed_BN - jax.lax.stop_gradient(relaxed_BN)))  # exact forward


def bottleneck_metrics(x_BN: jax.Array, z_BN: jax.Array) -> dict[str, jax.Array]:
  """{"l0": mean nonzeros per row of z, "kept_energy": ||z||^2 / ||x||^2 over the batch}."""
  energy = jnp.sum(jnp.square(x_BN))
  kept = jnp.sum(jnp.square(z_BN))
  return {"l0": jnp.mean(jnp.sum((z_BN != 0).astype(jnp.float32), axis=-1)),
          "kept_energy": jnp.where(energy > 0, kept / jnp.where(energy > 0, energy, 1.0), 1.0)}


class TopKBottleneck(nn.Module):
  """Keeps the k largest units of each row: `straight_through_top_k` or `gumbel_top_k`.

  mode "straight_through": z = top-k(x) forward, identity gradient. mode "gumbel": training (not
  `deterministic`) samples the kept units with Gumbel noise from the "noise" rng stream and
  backpropagates through the relaxed top-k at `temperature`; evaluation keeps the plain top-k.
  No params. Call: `(x_BN, *, deterministic=True) -> (z_BN, aux)`, aux metrics "l0" and
  "kept_energy". Bengio et al. 2013 (straight-through); Kool et al. 2019 and Xie & Ermon 2019
  (Gumbel top-k and its relaxation).
  """

  k: int
  mode: str = "straight_through"
  temperature: float = 1.0

  @nn.compact
  def __call__(self, x_BN: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}")
    if self.mode == "straight_through":
      z_BN = straight_through_top_k(x_BN, self.k)
    else:
      key = None if deterministic else self.make_rng("noise")
      z_BN = gumbel_top_k(x_BN, self.k, self.temperature, key)
    return z_BN, {"losses": {}, "metrics": bottleneck_metrics(x_BN, z_BN)}
