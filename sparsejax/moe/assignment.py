"""Balanced assignment: T tokens to E experts, exactly C = T / E each, maximising the total score.

The problem is the linear assignment max sum_t s[t, e_t] s.t. |{t : e_t = e}| = C for every e
(BASE layers, Lewis et al., 2021). It is a transportation problem whose dual has one price per
expert: at optimal prices pi, every token takes an expert maximising s[t, e] - pi_e. We solve it
exactly in two jit-able stages with static shapes:

  1. Sinkhorn (Cuturi, 2013), a fixed number of iterations on the entropic relaxation, gives
     near-optimal prices; each token takes its best expert at those prices.
  2. Successive shortest augmenting paths (min-cost flow; Ahuja, Magnanti and Orlin, 1993,
     "Network Flows", ch. 9) repair the loads. The tokens always sit at their best expert under
     the current prices, so the assignment is optimal for its loads; each repair moves one
     token out of an overloaded expert along the cheapest chain of token moves on the E-node
     expert graph and updates the prices, keeping that invariant. The loop runs exactly
     excess = sum_e max(0, n_e - C) < T times, usually a few dozen after the warm start.

The result is optimal up to float32 rounding. Cost per repair O(T E + E^3).
"""
import jax
import jax.numpy as jnp


def check_balanced_args(num_tokens: int, num_experts: int, temperature: float,
                        num_sinkhorn_iters: int) -> int:
  """Expert capacity C = T / E, after checking the arguments of `balanced_assignment`."""
  if num_experts < 1 or num_tokens % num_experts:
    raise ValueError(f"num_tokens must be a multiple of num_experts={num_experts} for balanced "
                     f"assignment, got {num_tokens}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if num_sinkhorn_iters < 0:
    raise ValueError(f"num_sinkhorn_iters must be >= 0, got {num_sinkhorn_iters}")
  return num_tokens // num_experts


def sinkhorn_prices(scores_TE: jax.Array, capacity: int, *, temperature: float,
                    num_iters: int) -> jax.Array:
  """Expert prices pi_E from Sinkhorn on the entropic balanced-assignment problem.

  With tau = temperature * std(s), the plan P = exp(s / tau + f_T + g_E) has rows summing to 1
  and columns to C after convergence (alternate log-domain updates of f and g, starting from
  g = 0; Cuturi, 2013); pi = -tau g, so argmax_e (s[t, e] - pi_e) is the plan's mode for t.
  Scaling tau by std(s) makes the prices independent of the scores' scale.
  """
  scale = temperature * jnp.maximum(jnp.std(scores_TE), 1e-6)
  z_TE = scores_TE / scale
  log_capacity = jnp.log(float(capacity))

  def token_potentials(g_E):
    return -jax.nn.logsumexp(z_TE + g_E[None, :], axis=1)

  def update(_, g_E):
    f_T = token_potentials(g_E)
    return log_capacity - jax.nn.logsumexp(z_TE + f_T[:, None], axis=0)

  g_E = jax.lax.fori_loop(0, num_iters, update, jnp.zeros(scores_TE.shape[1], jnp.float32))
  return -scale * g_E


def _move_costs(scores_TE: jax.Array, prices_E: jax.Array, expert_T: jax.Array):
  """Cheapest token move between every pair of experts under the current prices.

  With v = s - pi, moving token t from its expert a to b costs v[t, a] - v[t, b] >= 0 (clipped
  at 0 against rounding). Returns cost_EE[a, b], the cheapest such move (inf on the diagonal
  and out of empty experts), and token_EE[a, b], the lowest-index token achieving it.
  """
  num_tokens, num_experts = scores_TE.shape
  value_TE = scores_TE - prices_E[None, :]
  own_T1 = jnp.take_along_axis(value_TE, expert_T[:, None], axis=1)
  move_TE = jnp.maximum(own_T1 - value_TE, 0.0)
  cost_EE = jax.ops.segment_min(move_TE, expert_T, num_segments=num_experts)
  is_best_TE = move_TE == cost_EE[expert_T]
  index_TE = jnp.where(is_best_TE, jnp.arange(num_tokens)[:, None], num_tokens)
  token_EE = jax.ops.segment_min(index_TE, expert_T, num_segments=num_experts)
  cost_EE = jnp.where(jnp.eye(num_experts, dtype=bool), jnp.inf, cost_EE)
  return cost_EE, token_EE


def _shortest_paths(cost_EE: jax.Array, source_E: jax.Array):
  """Bellman-Ford from all `source_E` experts: distances and predecessors (-1 at sources).

  E - 1 rounds of dist_b <- min(dist_b, min_a dist_a + cost[a, b]); a predecessor changes only
  on strict improvement, so the predecessor graph is a forest rooted at the sources.
  """
  num_experts = cost_EE.shape[0]

  def relax(_, state):
    dist_E, pred_E = state
    via_EE = dist_E[:, None] + cost_EE
    best_E = jnp.min(via_EE, axis=0)
    better_E = best_E < dist_E
    return (jnp.where(better_E, best_E, dist_E),
            jnp.where(better_E, jnp.argmin(via_EE, axis=0).astype(jnp.int32), pred_E))

  init = (jnp.where(source_E, 0.0, jnp.inf), jnp.full((num_experts,), -1, jnp.int32))
  return jax.lax.fori_loop(0, num_experts - 1, relax, init)


def _repair_once(scores_TE: jax.Array, capacity: int, expert_T: jax.Array,
                 prices_E: jax.Array):
  """Move one unit of load from an overloaded to the nearest underloaded expert.

  The chain of moves is a shortest path in move costs; prices drop by min(dist_e, dist_sink),
  which keeps every move cost >= 0 (Johnson's reweighting), i.e. every token at its best
  expert.
  """
  num_experts = scores_TE.shape[1]
  load_E = jnp.bincount(expert_T, length=num_experts)
  cost_EE, token_EE = _move_costs(scores_TE, prices_E, expert_T)
  dist_E, pred_E = _shortest_paths(cost_EE, load_E > capacity)
  sink_dist_E = jnp.where(load_E < capacity, dist_E, jnp.inf)
  sink = jnp.argmin(sink_dist_E).astype(jnp.int32)

  def move_along_path(_, state):
    expert_T, node = state
    parent = pred_E[node]
    token = token_EE[jnp.maximum(parent, 0), node]
    moved_T = expert_T.at[token].set(node)
    on_path = parent >= 0
    return jnp.where(on_path, moved_T, expert_T), jnp.where(on_path, parent, node)

  expert_T, _ = jax.lax.fori_loop(0, num_experts, move_along_path, (expert_T, sink))
  return expert_T, prices_E - jnp.minimum(dist_E, sink_dist_E[sink])


def balanced_assignment(scores_TE: jax.Array, *, temperature: float = 0.05,
                        num_sinkhorn_iters: int = 50) -> jax.Array:
  """Expert of each token, int32 `[T]`: exactly T / E tokens per expert, max total score.

  Solves max sum_t s[t, e_t] s.t. every expert holds C = T / E tokens (BASE layers, Lewis et
  al., 2021) exactly, up to float32 rounding: Sinkhorn warm-start prices, then successive
  shortest-path repairs (see the module docstring). No gradient flows through the assignment.
  """
  num_tokens, num_experts = scores_TE.shape
  capacity = check_balanced_args(num_tokens, num_experts, temperature, num_sinkhorn_iters)
  scores_TE = jax.lax.stop_gradient(scores_TE.astype(jnp.float32))
  prices_E = sinkhorn_prices(scores_TE, capacity, temperature=temperature,
                             num_iters=num_sinkhorn_iters)
  expert_T = jnp.argmax(scores_TE - prices_E[None, :], axis=1).astype(jnp.int32)

  def unbalanced(state):
    return jnp.any(jnp.bincount(state[0], length=num_experts) != capacity)

  def repair(state):
    return _repair_once(scores_TE, capacity, *state)

  expert_T, _ = jax.lax.while_loop(unbalanced, repair, (expert_T, prices_E))
  return expert_T
