"""k-sparse linear probes: score neurons, keep the top k, fit an L2-regularised logistic regression.

A probe predicts a binary label y_n of token n from k of the F neurons of a site: the neurons
with the largest score (class-mean difference, |correlation| or F-statistic), then
p(y = 1 | a) = sigmoid(a_S w + b) on the selected set S. `byte_labels` and `probe_dataset` build
a toy labelled task from byte-level LM windows ("is this byte a digit", ...).
Gurnee et al. 2023, "Finding Neurons in a Haystack: Case Studies with Sparse Probing".
"""
import functools
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import sites as sites_lib

SCORES = ("mean_diff", "correlation", "f_stat")
LABELS = ("digit", "in_word", "after_space")
_WORD_BYTES = np.array([chr(b).isascii() and (chr(b).isalnum() or chr(b) == "_")
                        for b in range(256)])


class SparseProbe(NamedTuple):
  """A logistic regression on the neurons `indices_K`: logit = a[indices_K] . weights_K + bias;
  `accuracy` on the data it was fit on."""
  indices_K: jax.Array
  weights_K: jax.Array
  bias: jax.Array
  accuracy: jax.Array


@functools.partial(jax.jit, static_argnames="method")
def score_neurons(acts_NF: jax.Array, labels_N: jax.Array, method: str = "f_stat") -> jax.Array:
  """How well each neuron alone separates the classes; higher is better.

  With class means m1_f, m0_f, class sizes n1, n0 and N = n1 + n0:
  mean_diff = |m1_f - m0_f|; correlation = |Pearson r(a_f, y)|;
  f_stat = SS_between / (SS_within / (N - 2)), SS_between = n1 (m1 - m)^2 + n0 (m0 - m)^2
  (one-way ANOVA F; 0 where SS_within = 0 and SS_between = 0, inf where only SS_within = 0).
  """
  if method not in SCORES:
    raise ValueError(f"method={method!r}; allowed: {', '.join(SCORES)}")
  a_NF = acts_NF.astype(jnp.float32)
  y_N1 = jnp.asarray(labels_N, jnp.float32)[:, None]
  n1, n = jnp.sum(y_N1), a_NF.shape[0]
  n0 = n - n1
  m1_F = jnp.sum(a_NF * y_N1, 0) / jnp.maximum(n1, 1.0)
  m0_F = jnp.sum(a_NF * (1 - y_N1), 0) / jnp.maximum(n0, 1.0)
  if method == "mean_diff":
    return jnp.abs(m1_F - m0_F)
  m_F = jnp.mean(a_NF, 0)
  if method == "correlation":
    da_NF, dy_N1 = a_NF - m_F, y_N1 - jnp.mean(y_N1)
    cov_F = jnp.sum(da_NF * dy_N1, 0)
    denom_F = jnp.sqrt(jnp.sum(da_NF**2, 0) * jnp.sum(dy_N1**2))
    return jnp.where(denom_F > 0, jnp.abs(cov_F) / jnp.where(denom_F > 0, denom_F, 1.0), 0.0)
  between_F = n1 * (m1_F - m_F) ** 2 + n0 * (m0_F - m_F) ** 2
  within_F = jnp.sum((a_NF - jnp.where(y_N1 > 0, m1_F, m0_F)) ** 2, 0)
  return jnp.where(within_F > 0, between_F * (n - 2) / jnp.where(within_F > 0, within_F, 1.0),
                   jnp.where(between_F > 0, jnp.inf, 0.0))


def select_neurons(scores_F: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest scores, largest first (ties: lower index first)."""
  if not 1 <= k <= scores_F.shape[0]:
    raise ValueError(f"k={k}; allowed: 1 <= k <= {scores_F.shape[0]} (the number of neurons)")
  return jax.lax.top_k(scores_F, k)[1]


@functools.partial(jax.jit, static_argnames=("l2", "num_steps"))
def fit_logistic(x_NK: jax.Array, labels_N: jax.Array, *, l2: float = 1e-2,
                 num_steps: int = 25) -> tuple[jax.Array, jax.Array]:
  """(w_K, b) minimising sum_n [log(1 + e^{z_n}) - y_n z_n] + (l2 / 2) ||w||^2, z = x w + b,
  by `num_steps` Newton (IRLS) steps from 0: theta -= H^-1 g, with g = X~^T (p - y) + l2 w~,
  H = X~^T diag(p (1 - p)) X~ + l2 diag(1, ..., 1, 0), X~ = [x, 1] (the bias is not penalised).
  """
  if not l2 > 0:
    raise ValueError(f"l2={l2}; allowed: > 0 (keeps Newton's Hessian invertible)")
  x_NK1 = jnp.concatenate([x_NK.astype(jnp.float32), jnp.ones((x_NK.shape[0], 1))], 1)
  y_N = jnp.asarray(labels_N, jnp.float32)
  penalty_K1 = l2 * jnp.append(jnp.ones(x_NK.shape[1]), 0.0)

  def newton(_, theta_K1):
    p_N = jax.nn.sigmoid(x_NK1 @ theta_K1)
    grad_K1 = x_NK1.T @ (p_N - y_N) + penalty_K1 * theta_K1
    hess = (x_NK1.T * (p_N * (1 - p_N))) @ x_NK1 + jnp.diag(penalty_K1)
    return theta_K1 - jnp.linalg.solve(hess, grad_K1)

  theta_K1 = jax.lax.fori_loop(0, num_steps, newton, jnp.zeros(x_NK.shape[1] + 1))
  return theta_K1[:-1], theta_K1[-1]


@functools.partial(jax.jit, static_argnames=("k", "method", "l2", "num_steps"))
def fit_sparse_probe(acts_NF: jax.Array, labels_N: jax.Array, k: int, *, method: str = "f_stat",
                     l2: float = 1e-2, num_steps: int = 25) -> SparseProbe:
  """The k neurons of `select_neurons(score_neurons(acts, labels, method), k)` and the logistic
  regression `fit_logistic` on them, with its accuracy on (acts_NF, labels_N)."""
  indices_K = select_neurons(score_neurons(acts_NF, labels_N, method), k)
  weights_K, bias = fit_logistic(acts_NF[:, indices_K], labels_N, l2=l2, num_steps=num_steps)
  probe = SparseProbe(indices_K, weights_K, bias, jnp.zeros(()))
  return probe._replace(accuracy=probe_accuracy(probe, acts_NF, labels_N))


def probe_logits(probe: SparseProbe, acts_NF: jax.Array) -> jax.Array:
  """logit_n = a_n[indices_K] . weights_K + bias."""
  return acts_NF[:, probe.indices_K].astype(jnp.float32) @ probe.weights_K + probe.bias


def probe_accuracy(probe: SparseProbe, acts_NF: jax.Array, labels_N: jax.Array) -> jax.Array:
  """The fraction of n with [logit_n > 0] = y_n."""
  return jnp.mean((probe_logits(probe, acts_NF) > 0) == jnp.asarray(labels_N, bool))


def byte_labels(tokens_BT: np.ndarray, kind: str) -> np.ndarray:
  """bool [B, T] labels of byte tokens (ids >= 256, i.e. PAD / EOS, are never a word byte):

  digit: the byte is 0-9; in_word: it is a letter, digit or "_"; after_space: the previous byte
  in the window is " " (False at position 0).
  """
  if kind not in LABELS:
    raise ValueError(f"kind={kind!r}; allowed: {', '.join(LABELS)}")
  tokens_BT = np.asarray(tokens_BT)
  if kind == "digit":
    return (tokens_BT >= ord("0")) & (tokens_BT <= ord("9"))
  if kind == "in_word":
    return _WORD_BYTES[np.clip(tokens_BT, 0, 255)] & (tokens_BT < 256)
  after_BT = np.zeros(tokens_BT.shape, bool)
  after_BT[:, 1:] = tokens_BT[:, :-1] == ord(" ")
  return after_BT


def probe_dataset(model: Any, variables: Any, batches: Iterable[Mapping[str, Any]], site: str,
                  kind: str, **apply_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """(acts_NF, labels_N): the values of one site ([B, T, ...] -> rows of F) on the tokens of
  weight > 0 of `batches` ({"inputs": byte tokens [B, T], optionally "weights"}), labelled by
  `byte_labels(inputs, kind)`. `apply_kwargs` go to `model.apply`."""
  collect = jax.jit(lambda variables, tokens: sites_lib.collect(
      model, variables, tokens, sites=site, **apply_kwargs)[1])
  acts, labels = [], []
  for batch in batches:
    tokens_BT = np.asarray(batch["inputs"])
    captured = collect(variables, tokens_BT)
    if len(captured) != 1:
      raise ValueError(f"site={site!r} matches {list(captured)}; a probe reads one site")
    (value,) = captured.values()
    keep = np.asarray(batch.get("weights", np.ones(tokens_BT.shape))).reshape(-1) > 0
    acts.append(np.asarray(value, np.float32).reshape(tokens_BT.size, -1)[keep])
    labels.append(byte_labels(tokens_BT, kind).reshape(-1)[keep])
  return np.concatenate(acts), np.concatenate(labels)
