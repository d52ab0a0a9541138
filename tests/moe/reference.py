"""Naive per-token / per-expert references for the MoE tests, written without the library."""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def top_k(logits, k, order="softmax_then_topk", renormalize=False, bias=None):
  """Per token: sort experts by (logit + bias) descending, ties by index; gates per `order`."""
  logits = np.asarray(logits, np.float64)
  select = logits if bias is None else logits + np.asarray(bias, np.float64)
  experts, gates = [], []
  for t in range(logits.shape[0]):
    chosen = sorted(range(logits.shape[1]), key=lambda e: (-select[t, e], e))[:k]
    if order == "softmax_then_topk":
      g = softmax(logits[t])[chosen]
      if renormalize:
        g = g / g.sum()
    else:
      g = softmax(logits[t, chosen])
    experts.append(chosen)
    gates.append(g)
  return np.array(experts), np.array(gates)


def expert_choice(logits, capacity):
  """Per expert: its `capacity` tokens of highest probability (ties by token index)."""
  probs = softmax(logits)
  num_tokens, num_experts = probs.shape
  keep = np.zeros((num_tokens, num_experts), bool)
  for e in range(num_experts):
    for t in sorted(range(num_tokens), key=lambda t: (-probs[t, e], t))[:capacity]:
      keep[t, e] = True
  return keep, np.where(keep, probs, 0.0)


def threshold(logits, p, k_max, renormalize=False):
  """Per token: experts by descending probability until the running sum reaches p."""
  probs = softmax(logits)
  experts, gates, valid = [], [], []
  for t in range(probs.shape[0]):
    order = sorted(range(probs.shape[1]), key=lambda e: (-probs[t, e], e))[:k_max]
    total, taken = 0.0, []
    for e in order:
      taken.append(total < p)
      total += probs[t, e]
    g = np.where(taken, probs[t, order], 0.0)
    if renormalize:
      g = g / g.sum()
    experts.append(order)
    gates.append(g)
    valid.append(taken)
  return np.array(experts), np.array(gates), np.array(valid)


def capacity_keep(experts, valid, gates, capacity, priority):
  """Which pairs keep a slot: visit choice k = 0, 1, ... and tokens in priority order."""
  num_tokens, k = experts.shape
  if priority == "position":
    tokens = list(range(num_tokens))
  else:
    tokens = sorted(range(num_tokens), key=lambda t: (-gates[t].max(), t))
  used = {}
  keep = np.zeros_like(valid)
  for j in range(k):
    for t in tokens:
      if valid[t, j]:
        e = experts[t, j]
        if used.get(e, 0) < capacity:
          keep[t, j] = True
        used[e] = used.get(e, 0) + 1
  return keep


def ffn(x, weights, e, kind):
  """Expert e's FFN on rows x with jnp ops (differentiable)."""
  h = x @ weights["wi_EDF"][e]
  if kind == "swiglu":
    h = jax.nn.silu(x @ weights["wg_EDF"][e]) * h
  else:
    h = jax.nn.gelu(h)
  return h @ weights["wo_EFD"][e]


def moe_loop(x_TD, weights, experts, gates_TK, keep, kind):
  """y_t = sum over kept (t, k) of gate_tk * FFN_{e_tk}(x_t), one expert at a time."""
  y_TD = jnp.zeros_like(x_TD)
  for e in range(weights["wi_EDF"].shape[0]):
    tokens, choices = np.nonzero(keep & (experts == e))
    if tokens.size:
      out = ffn(x_TD[tokens], weights, e, kind)
      y_TD = y_TD.at[tokens].add(gates_TK[tokens, choices][:, None] * out)
  return y_TD


def balanced_optimum(scores, capacity):
  """Best total score with `capacity` tokens per expert: linear_sum_assignment on the T x T
  matrix whose columns are the experts, each repeated `capacity` times."""
  slots = np.repeat(np.asarray(scores, np.float64), capacity, axis=1)
  rows, cols = scipy.optimize.linear_sum_assignment(slots, maximize=True)
  return slots[rows, cols].sum()


def sinkhorn_log_v(z, capacity, num_iters):
  """Sinkhorn in scaling form on K = exp(z): u = 1 / (K v), v = C / (K^T u), from v = 1; log v."""
  kernel = np.exp(np.asarray(z, np.float64))
  v = np.ones(kernel.shape[1])
  for _ in range(num_iters):
    u = 1.0 / (kernel @ v)
    v = capacity / (kernel.T @ u)
  return np.log(v)


def avg_k(x, w, k):
  """Per token: the k experts whose mean first-layer key has the largest dot product with x."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  scores = np.array([[x[t] @ w[e].mean(axis=1) for e in range(w.shape[0])]
                     for t in range(x.shape[0])])
  experts = [sorted(range(w.shape[0]), key=lambda e: (-scores[t, e], e))[:k]
             for t in range(x.shape[0])]
  return scores, np.array(experts)


def prototype(logits, k):
  """Per token and group g of E / k experts: the group's argmax, gate its in-group softmax."""
  logits = np.asarray(logits, np.float64)
  size = logits.shape[1] // k
  experts, gates = [], []
  for t in range(logits.shape[0]):
    row_e, row_g = [], []
    for g in range(k):
      probs = softmax(logits[t, g * size:(g + 1) * size])
      row_e.append(g * size + int(np.argmax(probs)))
      row_g.append(probs.max())
    experts.append(row_e)
    gates.append(row_g)
  return np.array(experts), np.array(gates)


def cluster_variance(probs, cluster_size):
  """Mean over tokens and clusters of the population variance of p within the cluster."""
  probs = np.asarray(probs, np.float64)
  values = [np.var(probs[t, g:g + cluster_size])
            for t in range(probs.shape[0]) for g in range(0, probs.shape[1], cluster_size)]
  return np.mean(values)
