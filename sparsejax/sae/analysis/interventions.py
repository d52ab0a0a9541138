"""Interventions on latents: attribution of an output to each latent, and steering by an atom."""
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from sparsejax.sae.analysis._checks import check_int, check_ndim, check_same


def attribute_latents(scalar_fn: Callable[[jax.Array], jax.Array], acts_TN: Any, *,
                      baseline_TN: Any = None, steps: int = 1) -> jax.Array:
  """Estimated effect on scalar_fn of setting each latent entry to its baseline, [T, N].

  attr[t, n] ~ f(a) - f(a with a_tn := b_tn), for f = `scalar_fn` (the rest of the model, from
  the latents to e.g. a logit difference) and baseline b (zeros: ablation). steps = 1 is
  attribution patching, the first-order estimate (a - b) * grad f(a); steps = S > 1 is integrated
  gradients with the midpoint rule, (a - b) * mean_s grad f(b + (s + 1/2)/S (a - b)). Both are
  exact for f linear in a; integrated gradients is also exact for a separable quadratic.
  Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery"; Marks et al.
  2024, "Sparse Feature Circuits"; Sundararajan et al. 2017, "Axiomatic Attribution for Deep
  Networks".
  """
  check_int("steps", steps, 1)
  acts_TN = jnp.asarray(acts_TN, jnp.float32)
  baseline_TN = (jnp.zeros_like(acts_TN) if baseline_TN is None
                 else jnp.asarray(baseline_TN, jnp.float32))
  check_same("baseline's shape", baseline_TN.shape, acts_TN.shape, "acts' shape")
  grad_fn = jax.grad(lambda a: jnp.asarray(scalar_fn(a), jnp.float32).reshape(()))
  delta_TN = acts_TN - baseline_TN
  alphas_S = jnp.ones((1,)) if steps == 1 else (jnp.arange(steps) + 0.5) / steps
  # One gradient at a time: scalar_fn may be a whole LM, too big to batch over the steps.
  sum_grad_TN = jax.lax.fori_loop(
      0, steps, lambda s, acc: acc + grad_fn(baseline_TN + alphas_S[s] * delta_TN),
      jnp.zeros_like(acts_TN))
  return delta_TN * sum_grad_TN / steps


def steer_fn(atom_D: Any, alpha: Any) -> Callable[[jax.Array], jax.Array]:
  """The site function x -> x + alpha * atom, for splicing into the residual stream ([..., D]).

  With atom = W_dec[n] this pushes every position along latent n's direction; alpha sets the
  strength (negative alpha steers away). The returned function is pure and jit-safe.
  Templeton et al. 2024, "Scaling Monosemanticity" (feature steering); Turner et al. 2023,
  "Activation Addition: Steering Language Models Without Optimization".
  """
  check_ndim("atom", atom_D, 1, "(D,)")
  atom_D = jnp.asarray(atom_D)

  def steer(x_TD: jax.Array) -> jax.Array:
    x_TD = jnp.asarray(x_TD)
    check_same("x's last dim", x_TD.shape[-1], atom_D.shape[0], "the atom's D")
    return x_TD + jnp.asarray(alpha, x_TD.dtype) * atom_D.astype(x_TD.dtype)

  return steer


def steering_effect(logits_clean_TV: Any, logits_steered_TV: Any,
                    token_ids: Sequence[int] | jax.Array) -> dict[str, jax.Array]:
  """How steering moved the next-token distribution: mean KL, and chosen tokens' log-prob change.

  Over the positions t (any leading axes) with p = softmax(clean logits), q = softmax(steered):
  kl = mean_t KL(p_t || q_t) = mean_t sum_v p_tv (log p_tv - log q_tv), and
  delta_logprob[s] = mean_t (log q_t[token_ids[s]] - log p_t[token_ids[s]]) for the S chosen
  vocabulary ids (e.g. the tokens of the steered concept). A good steer raises delta_logprob at a
  small kl. Templeton et al. 2024, "Scaling Monosemanticity" (feature steering).
  """
  logits_clean_TV = jnp.asarray(logits_clean_TV, jnp.float32)
  logits_steered_TV = jnp.asarray(logits_steered_TV, jnp.float32)
  check_same("logits_steered's shape", logits_steered_TV.shape, logits_clean_TV.shape,
             "logits_clean's shape")
  token_ids_S = jnp.asarray(token_ids)
  check_ndim("token_ids", token_ids_S, 1, "(S,)")
  return _steering_effect(logits_clean_TV, logits_steered_TV, token_ids_S)


@jax.jit
def _steering_effect(logits_clean_TV: jax.Array, logits_steered_TV: jax.Array,
                     token_ids_S: jax.Array) -> dict[str, jax.Array]:
  log_p_TV = jax.nn.log_softmax(logits_clean_TV, axis=-1)
  log_q_TV = jax.nn.log_softmax(logits_steered_TV, axis=-1)
  kl_T = jnp.sum(jnp.exp(log_p_TV) * (log_p_TV - log_q_TV), axis=-1)
  delta_TS = jnp.take(log_q_TV - log_p_TV, token_ids_S, axis=-1)
  return {"kl": jnp.mean(kl_T),
          "delta_logprob": jnp.mean(delta_TS.reshape(-1, token_ids_S.shape[0]), axis=0)}
