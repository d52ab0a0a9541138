"""Top-k and predicted (contextual-sparsity) FFNs, each with a masked and a gathered path.

Registered FFNs (`sparsejax.registry.FFNS`): "topk" (`TopKFFN`) and "predicted" (`PredictedFFN`).
Both keep k of the F hidden units per token and share DenseFFN's params ("wi", "wi_gate" for
swiglu, "wo"; same shapes and logical axes), so a dense checkpoint loads into them.

* masked path (training, long inputs): the dense hidden layer times a 0/1 mask of the k kept
  units; gradients reach the kept units only. O(T F D).
* gathered path (decode, few tokens): only the k kept units are computed or read. For "topk"
  the whole pre-activation x W_in is still needed to rank the units (O(T F D) for W_in), but
  only k rows of W_out are read; for "predicted" a low-rank predictor picks the units, and only
  k columns of W_in (and W_gate) and k rows of W_out are read: O(T k D + T R (D + F)).

Params of one FFN are a dict {"wi": [D, F], "wi_gate": [D, F] (swiglu), "wo": [F, D],
"predictor_a": [D, R], "predictor_b": [R, F] (predicted)}. The gathered pure functions take the
decode layout of `gathered_params(params)`, which stores W_in^T ("wi_t": [F, D], and
"wi_gate_t") once: its rows are the columns of W_in, read contiguously. The Linen modules keep
DenseFFN's [D, F] params and gather strided columns of W_in: slower (predicted, batch 1,
D = 1024, F = 4096, 10 %: 1.5-1.6x faster than dense, against 2.6x from `gathered_params`; see
experiments/bench/activations.py), so the fastest decode calls the pure functions on
`gathered_params`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.models.layers import ACTIVATIONS, logical_param
from sparsejax.ops import gather_decode, top_k_blocked
from sparsejax.registry import FFNS
from sparsejax.sites import Site

PATHS = ("auto", "masked", "gathered")
Params = dict[str, jax.Array]


def num_active(d_ff: int, k: int | None, active_fraction: float) -> int:
  """The kept units per token: `k` when given, else max(1, round(active_fraction * d_ff))."""
  if k is not None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d_ff:
      raise ValueError(f"k={k!r} must be an int in [1, {d_ff}] (d_ff)")
    return int(k)
  if not 0.0 < active_fraction <= 1.0:
    raise ValueError(f"active_fraction={active_fraction!r} must lie in (0, 1]")
  return max(1, round(active_fraction * d_ff))


def check_activation(activation: str) -> None:
  """A one-line ValueError unless `activation` is one of DenseFFN's ("gelu", "swiglu")."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")


def hidden_units(params: Params, x_TD: jax.Array, activation: str) -> jax.Array:
  """h_TF = gelu(x W_in), or silu(x W_gate) * (x W_in) for swiglu: DenseFFN's hidden layer."""
  h_TF = x_TD @ params["wi"]
  if activation == "gelu":
    return nn.gelu(h_TF, approximate=True)
  return nn.silu(x_TD @ params["wi_gate"]) * h_TF


def topk_units(h_TF: jax.Array, k: int) -> jax.Array:
  """idx_TK: the k units of largest |h| per token (int32, by decreasing |h|).

  Magnitude, not value: a swiglu unit with a large negative output matters as much as a positive
  one (gelu's outputs are > -0.17, so for gelu the two orders pick the same units whenever the
  k-th largest output exceeds 0.17).
  """
  _, idx_TK = top_k_blocked(jnp.abs(h_TF), k)
  return idx_TK.astype(jnp.int32)


def unit_mask(idx_TK: jax.Array, num_units: int, dtype: Any = jnp.float32) -> jax.Array:
  """m_TF = 1 at (t, idx[t, k]) for every k, else 0."""
  rows_T1 = jnp.arange(idx_TK.shape[0])[:, None]
  return jnp.zeros((idx_TK.shape[0], num_units), dtype).at[rows_T1, idx_TK].set(1)


def topk_ffn(params: Params, x_TD: jax.Array, k: int, activation: str = "gelu") -> jax.Array:
  """y = (h * m) W_out with h = act(x W_in), m the 0/1 mask of the k largest |h| per token.

  The masked path: O(T F D); the mask is constant, so gradients reach the kept units only.
  """
  h_TF = hidden_units(params, x_TD, activation)
  mask_TF = unit_mask(topk_units(jax.lax.stop_gradient(h_TF), k), h_TF.shape[1], h_TF.dtype)
  return (h_TF * mask_TF) @ params["wo"]


def topk_ffn_gathered(params: Params, x_TD: jax.Array, k: int,
                      activation: str = "gelu") -> jax.Array:
  """y_t = sum_k h[t, i_k] W_out[i_k], i = the k largest |h_t|: `topk_ffn` reading k rows of W_out.

  h = act(x W_in) is computed in full (ranking needs every unit): O(T F D) for W_in,
  O(T k D) for W_out (`sparsejax.ops.gather_decode`).
  """
  h_TF = hidden_units(params, x_TD, activation)
  idx_TK = topk_units(jax.lax.stop_gradient(h_TF), k)
  return gather_decode(params["wo"], idx_TK, jnp.take_along_axis(h_TF, idx_TK, axis=1))


def gathered_params(params: Params) -> Params:
  """The decode layout of an FFN's params: "wi" -> "wi_t" = W_in^T [F, D] (and "wi_gate" ->
  "wi_gate_t"), other entries unchanged. Run once; the gathered path then reads rows."""
  prepared = {name: value for name, value in params.items() if name not in ("wi", "wi_gate")}
  for name in ("wi", "wi_gate"):
    if name in params:
      prepared[f"{name}_t"] = params[name].T
  return prepared


def gathered_hidden(params: Params, x_TD: jax.Array, idx_TK: jax.Array,
                    activation: str) -> jax.Array:
  """h_TK = act(<x_t, W_in[:, idx[t, k]]>) (swiglu: times silu of W_gate's): O(T k D).

  Reads the rows idx of W_in^T when `params` is in the decode layout of `gathered_params`
  ("wi_t", contiguous rows), else the columns idx of W_in ("wi", strided: slower, see
  experiments/bench/activations.py).
  """

  def dot(name):
    if f"{name}_t" in params:
      rows_TKD = jnp.take(params[f"{name}_t"], idx_TK, axis=0, mode="clip")
      return jnp.einsum("td,tkd->tk", x_TD, rows_TKD)
    cols_DTK = jnp.take(params[name], idx_TK, axis=1, mode="clip")
    return jnp.einsum("td,dtk->tk", x_TD, cols_DTK)

  h_TK = dot("wi")
  if activation == "gelu":
    return nn.gelu(h_TK, approximate=True)
  return nn.silu(dot("wi_gate")) * h_TK


def gathered_ffn(params: Params, x_TD: jax.Array, idx_TK: jax.Array,
                 activation: str = "gelu") -> jax.Array:
  """y_t = sum_k act(x_t W_in[:, i_k]) W_out[i_k] for the given units i = idx[t]: O(T k D).

  Equals the masked FFN (h * m) W_out for the mask m of idx. `params` in either layout (see
  `gathered_hidden`; `gathered_params`' is the fast one).
  """
  h_TK = gathered_hidden(params, x_TD, idx_TK, activation)
  return gather_decode(params["wo"], idx_TK, h_TK)


def predictor_scores(params: Params, x_TD: jax.Array) -> jax.Array:
  """s_TF = (x A) B, the low-rank predictor's score of every unit (A: [D, R], B: [R, F]).

  Liu et al. 2023, "Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time".
  """
  return (x_TD @ params["predictor_a"]) @ params["predictor_b"]


def predictor_loss(scores_TF: jax.Array, target_idx_TK: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of sigmoid(s) against the 0/1 mask t of the target units.

  L = -mean_{t,f} [t_tf log sigmoid(s_tf) + (1 - t_tf) log(1 - sigmoid(s_tf))]; the targets
  are constants (no gradient). Liu et al. 2023 (Deja Vu), predictors trained as classifiers.
  """
  target_TF = unit_mask(target_idx_TK, scores_TF.shape[1], scores_TF.dtype)
  log_p_TF, log_not_p_TF = jax.nn.log_sigmoid(scores_TF), jax.nn.log_sigmoid(-scores_TF)
  return -jnp.mean(target_TF * log_p_TF + (1 - target_TF) * log_not_p_TF)


def recall(idx_TK: jax.Array, true_idx_TK: jax.Array, num_units: int) -> jax.Array:
  """Mean over tokens of |idx_t ∩ true_idx_t| / K (indices distinct within a row)."""
  hits_TF = unit_mask(idx_TK, num_units) * unit_mask(true_idx_TK, num_units)
  return jnp.sum(hits_TF) / true_idx_TK.size


def predicted_units(params: Params, x_TD: jax.Array, k: int) -> jax.Array:
  """idx_TK: the k units of largest predictor score per token."""
  _, idx_TK = top_k_blocked(predictor_scores(params, x_TD), k)
  return idx_TK.astype(jnp.int32)


def predicted_ffn(params: Params, x_TD: jax.Array, k: int,
                  activation: str = "gelu") -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, predictor loss, recall): the masked path of the predicted FFN.

  p = top-k of (sg(x) A) B; y = (h * m_p) W_out with h = act(x W_in); true = top-k of |h|;
  loss = predictor_loss((sg(x) A) B, true) trains only A, B (x and the targets are stop-
  gradients and the selection is discrete), recall = |p ∩ true| / k.
  Liu et al. 2023, "Deja Vu"; Khaki et al. 2025, "SparseLoRA" (trained jointly as here).
  """
  scores_TF = predictor_scores(params, jax.lax.stop_gradient(x_TD))
  _, idx_TK = top_k_blocked(jax.lax.stop_gradient(scores_TF), k)
  h_TF = hidden_units(params, x_TD, activation)
  true_idx_TK = topk_units(jax.lax.stop_gradient(h_TF), k)
  y_TD = (h_TF * unit_mask(idx_TK, h_TF.shape[1], h_TF.dtype)) @ params["wo"]
  num_units = h_TF.shape[1]
  return y_TD, predictor_loss(scores_TF, true_idx_TK), recall(idx_TK, true_idx_TK, num_units)


def predicted_ffn_gathered(params: Params, x_TD: jax.Array, k: int,
                           activation: str = "gelu") -> jax.Array:
  """y_t = sum_k act(x_t W_in[:, p_k]) W_out[p_k], p = top-k of (x A) B: `predicted_ffn`'s
  output reading k columns of W_in (W_gate) and k rows of W_out. O(T (R (D + F) + k D)).
  `params` in either layout (see `gathered_hidden`)."""
  return gathered_ffn(params, x_TD, predicted_units(params, x_TD, k), activation)


class _SparseFFN(nn.Module):
  """Fields and helpers shared by TopKFFN and PredictedFFN."""

  d_model: int
  d_ff: int
  k: int | None = None
  active_fraction: float = 0.1
  activation: str = "gelu"
  path: str = "auto"
  gathered_max_tokens: int = 16
  dtype: Any = jnp.float32

  def _check(self, x_BTD: jax.Array, deterministic: bool) -> tuple[int, bool]:
    """(k, whether to take the gathered path), with one-line errors for bad fields. "auto"
    gathers only in deterministic calls (inference), so training always gets the masked path
    and, for PredictedFFN, the predictor's loss."""
    check_activation(self.activation)
    if self.path not in PATHS:
      raise ValueError(f"path={self.path!r}; allowed: {', '.join(PATHS)}")
    k = num_active(self.d_ff, self.k, self.active_fraction)
    num_tokens = x_BTD.shape[0] * x_BTD.shape[1]
    gathered = self.path == "gathered" or (
        self.path == "auto" and deterministic and num_tokens <= self.gathered_max_tokens)
    return k, gathered

  def _ffn_params(self) -> Params:
    params = {"wi": self._weight("wi", (self.d_model, self.d_ff), ("embed", "mlp"))}
    if self.activation == "swiglu":
      params["wi_gate"] = self._weight("wi_gate", (self.d_model, self.d_ff), ("embed", "mlp"))
    params["wo"] = self._weight("wo", (self.d_ff, self.d_model), ("mlp", "embed"))
    return params

  def _weight(self, name: str, shape: tuple[int, int], axes: tuple[str | None, ...]) -> jax.Array:
    return logical_param(self, name, nn.initializers.lecun_normal(), shape, axes, self.dtype)

  def _hidden_site(self, h_TF: jax.Array, batch: int, length: int) -> jax.Array:
    """h_TF through the "hidden" site as [B, T, F], DenseFFN's layout (stats, probes and
    patching index its axis 1 by position)."""
    return Site(name="hidden")(h_TF.reshape(batch, length, self.d_ff)).reshape(h_TF.shape)

  def _gathered_output(self, params: Params, idx_TK: jax.Array, h_TK: jax.Array, batch: int,
                       length: int) -> jax.Array:
    """sum_k h[t, k] W_out[idx[t, k]], with the "hidden" site on the scattered [B, T, F] units
    (in this path a site function sees, and its edits reach, the k kept units only)."""
    rows_T1 = jnp.arange(idx_TK.shape[0])[:, None]
    h_TF = self._hidden_site(
        jnp.zeros((idx_TK.shape[0], self.d_ff), h_TK.dtype).at[rows_T1, idx_TK].set(h_TK),
        batch, length)
    h_TK = jnp.take_along_axis(h_TF, idx_TK, axis=1)
    return gather_decode(params["wo"], idx_TK, h_TK)

  def _metrics(self, k: int) -> dict[str, jax.Array]:
    return {"active_fraction": jnp.asarray(k / self.d_ff, jnp.float32)}


@FFNS.register("topk")
class TopKFFN(_SparseFFN):
  """FFN "topk": DenseFFN keeping the k hidden units of largest |h| per token.

  y = (h * m) W_out, h = gelu(x W_in) or silu(x W_gate) * (x W_in), m the 0/1 mask of the
  top-k |h| per token; k = `k`, else round(active_fraction * F). DenseFFN's params.
  `path`: "masked" (dense h times the mask; what training uses), "gathered" (h in full, then
  only k rows of W_out: `topk_ffn_gathered`), "auto" (gathered in deterministic calls with
  B T <= `gathered_max_tokens`, i.e. decode). Sites "in", "hidden" (the masked units), "out".
  aux metrics: active_fraction = k / F.
  Makhzani & Frey 2014, "k-Sparse Autoencoders" (top-k activations); Liu et al. 2023 (Deja Vu)
  on the gathered decode.
  """

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    k, gathered = self._check(x_BTD, deterministic)
    batch, length, _ = x_BTD.shape
    x_TD = Site(name="in")(x_BTD.astype(self.dtype)).reshape(batch * length, self.d_model)
    params = self._ffn_params()
    h_TF = hidden_units(params, x_TD, self.activation)
    idx_TK = topk_units(jax.lax.stop_gradient(h_TF), k)
    if gathered:
      y_TD = self._gathered_output(params, idx_TK, jnp.take_along_axis(h_TF, idx_TK, axis=1),
                                   batch, length)
    else:
      h_TF = self._hidden_site(h_TF * unit_mask(idx_TK, self.d_ff, h_TF.dtype), batch, length)
      y_TD = h_TF @ params["wo"]
    y_BTD = Site(name="out")(y_TD.reshape(batch, length, self.d_model))
    return y_BTD, {"losses": {}, "metrics": self._metrics(k)}


@FFNS.register("predicted")
class PredictedFFN(_SparseFFN):
  """FFN "predicted": contextual sparsity, a low-rank predictor picks the k active units.

  p = top-k of s = (sg(x) A) B (A: [D, R] "predictor_a", B: [R, F] "predictor_b", R = `rank`);
  y = (h * m_p) W_out with h, W_in, W_gate, W_out as in DenseFFN (its params). The predictor is
  trained jointly, against the true top-k of |h| (stop-gradient targets): aux loss "predictor" =
  predictor_coeff * BCE(s, mask of true top-k), which reaches only A and B. Under Adam with
  global-norm clipping a small predictor_coeff (0.01 in experiments/configs/predicted_ffn_lm.py)
  leaves the predictor's updates as they are and its share of the clipped norm small.
  `path`: "masked" (training: h in full, so the true top-k, loss and recall exist), "gathered"
  (decode: only k columns of W_in / W_gate and k rows of W_out are read, no loss), "auto"
  (gathered in deterministic calls with B T <= `gathered_max_tokens`, so training always trains
  the predictor). Sites "in", "hidden", "out".
  aux metrics: active_fraction = k / F; recall = |p ∩ true top-k| / k (masked path).
  Liu et al. 2023, "Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time";
  Khaki et al. 2025, "SparseLoRA: Accelerating LLM Fine-Tuning with Contextual Sparsity".
  """

  rank: int = 32
  predictor_coeff: float = 1.0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    k, gathered = self._check(x_BTD, deterministic)
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"rank={self.rank!r} must be a positive int")
    batch, length, _ = x_BTD.shape
    x_TD = Site(name="in")(x_BTD.astype(self.dtype)).reshape(batch * length, self.d_model)
    params = self._ffn_params()
    params["predictor_a"] = self._weight("predictor_a", (self.d_model, self.rank), ("embed", None))
    params["predictor_b"] = self._weight("predictor_b", (self.rank, self.d_ff), (None, "mlp"))
    scores_TF = predictor_scores(params, jax.lax.stop_gradient(x_TD))
    _, idx_TK = top_k_blocked(jax.lax.stop_gradient(scores_TF), k)
    idx_TK = idx_TK.astype(jnp.int32)
    metrics = self._metrics(k)
    if gathered:
      h_TK = gathered_hidden(params, x_TD, idx_TK, self.activation)
      y_TD, losses = self._gathered_output(params, idx_TK, h_TK, batch, length), {}
    else:
      h_TF = hidden_units(params, x_TD, self.activation)
      true_idx_TK = topk_units(jax.lax.stop_gradient(h_TF), k)
      losses = {"predictor": self.predictor_coeff * predictor_loss(scores_TF, true_idx_TK)}
      metrics["recall"] = recall(idx_TK, true_idx_TK, self.d_ff)
      h_TF = self._hidden_site(h_TF * unit_mask(idx_TK, self.d_ff, h_TF.dtype), batch, length)
      y_TD = h_TF @ params["wo"]
    y_BTD = Site(name="out")(y_TD.reshape(batch, length, self.d_model))
    return y_BTD, {"losses": losses, "metrics": metrics}

