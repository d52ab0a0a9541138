"""Load-balancing losses, router z-loss, MoEC cluster variance and aux-loss-free bias balancing."""
import jax
import jax.numpy as jnp

from sparsejax.moe.plan import DispatchPlan
from sparsejax.moe.plan import group_sizes


def expert_fraction(plan: DispatchPlan) -> jax.Array:
  """f_e: fraction of the plan's kept (token, choice) pairs that go to expert e; sums to 1.

  Pass the router's plan before capacity to measure routing rather than dropping.
  """
  counts_E = group_sizes(plan).astype(jnp.float32)
  return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)


def load_balance_loss(probs_TE: jax.Array, fraction_E: jax.Array) -> jax.Array:
  """Switch load-balance loss E * sum_e f_e * P_e, P_e = mean_t p_te; 1 when uniform.

  f_e (from `expert_fraction`) is piecewise constant, so the gradient flows through P only
  (Fedus et al., 2021, eq. 4; k > 1 as in GShard, Lepikhin et al., 2020).
  """
  num_experts = probs_TE.shape[-1]
  mean_prob_E = jnp.mean(probs_TE.astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(jax.lax.stop_gradient(fraction_E) * mean_prob_E)


def importance_loss(plan: DispatchPlan) -> jax.Array:
  """Squared coefficient of variation of expert importance, CV(I)^2 = Var(I) / mean(I)^2.

  I_e = sum of the gates of the pairs routed to e (Shazeer et al., 2017, eq. 6; population
  variance).
  """
  importance_E = jax.ops.segment_sum(plan.gate_TK.reshape(-1), plan.expert_TK.reshape(-1),
                                     num_segments=plan.num_experts)
  return jnp.var(importance_E) / jnp.maximum(jnp.mean(importance_E) ** 2, 1e-12)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
  """mean_t (log sum_e exp logits_te)^2, keeping router logits small (Zoph et al., 2022, ST-MoE)."""
  return jnp.mean(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1) ** 2)


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step: b_e <- b_e + rate * sign(mean(load) - load_e).

  Underloaded experts get a higher selection bias, overloaded ones a lower one. The update is
  outside the gradient (`stop_gradient`); the bias only shifts top-k selection (see
  `route_top_k(bias_E=...)`), never the gates (Wang et al., 2024, "Auxiliary-Loss-Free Load
  Balancing Strategy for Mixture-of-Experts"; DeepSeek-V3).
  """
  load_E = load_E.astype(jnp.float32)
  step_E = rate * jnp.sign(jnp.mean(load_E) - load_E)
  return jax.lax.stop_gradient(bias_E + step_E.astype(bias_E.dtype))


def cluster_variance_loss(probs_TE: jax.Array, cluster_size: int) -> jax.Array:
  """Mean variance of routing probabilities within expert clusters.

  L = 1 / (T G) sum_t sum_g Var_{e in cluster g}(p_te), population variance over the c experts
  [g c, (g + 1) c) of cluster g, G = E / c. Minimising it makes the experts of a cluster
  receive similar tokens (MoEC's variance-based constraint; Xie et al., 2023, "MoEC: Mixture
  of Expert Clusters").
  """
  num_tokens, num_experts = probs_TE.shape
  probs_TGC = probs_TE.astype(jnp.float32).reshape(num_tokens, num_experts // cluster_size,
                                                   cluster_size)
  return jnp.mean(jnp.var(probs_TGC, axis=-1))
