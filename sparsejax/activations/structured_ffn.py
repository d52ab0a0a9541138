"""Structured activation sparsity in the FFN: R-Sparse input channels and N:M hidden masks.

R-Sparse keeps the k largest-|x| input channels of every linear layer exactly (only those rows
of W are read) and approximates the other channels' contribution with a fixed rank-r SVD of W.
N:M activation masks keep the n largest-|h| hidden units in every group of m consecutive ones,
so the second matmul reads only F n / m rows of W_out per token.

Shape letters beyond the DESIGN legend: R the low-rank width, G groups of m hidden units,
M the group size m, N the kept units per group n (K = F n / m kept units per token).
"""
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.models.layers import logical_param
from sparsejax.ops import gather_decode
from sparsejax.registry import FFNS
from sparsejax.sites import Site

ACTIVATIONS = ("gelu", "swiglu", "relu2")
IMPLEMENTATIONS = ("masked", "gathered")
# The weights of an FFN with DenseFFN's params that R-Sparse approximates; "wi_gate" for swiglu.
LINEAR_WEIGHTS = ("wi", "wi_gate", "wo")
LOWRANK_COLLECTION = "lowrank"

LowRank = tuple[jax.Array, jax.Array]


# ------------------------------------------------------------------------------ R-Sparse


def lowrank_factors(w_DF: jax.Array, rank: int) -> LowRank:
  """(a_DR, b_RF) = (U_r S_r, V_r^T): the best rank-r approximation W ~ a b (truncated SVD).

  W = U S V^T with singular values in descending order; a b is the Eckart-Young optimum in
  Frobenius and spectral norm. Computed in float32.
  Zhang et al. 2025, "R-Sparse: Rank-Aware Activation Sparsity for Efficient LLM Inference".
  """
  if w_DF.ndim != 2:
    raise ValueError(f"w_DF must be [D, F]; got shape {w_DF.shape}")
  _check_count("rank", rank, min(w_DF.shape))
  return _truncated_svd(w_DF, int(rank))


@functools.partial(jax.jit, static_argnums=1)
def _truncated_svd(w_DF: jax.Array, rank: int) -> LowRank:
  u_DS, s_S, vt_SF = jnp.linalg.svd(w_DF.astype(jnp.float32), full_matrices=False)
  return u_DS[:, :rank] * s_S[:rank], vt_SF[:rank]


def rsparse_linear(x_TD: jax.Array, w_DF: jax.Array, w_lowrank_factors: LowRank,
                   k: int) -> jax.Array:
  """y = x_s W + (x - x_s) a b: the k largest-|x| channels exact, the rest through rank-r W.

  x_s holds x's k largest-|x| entries per token (the others zero) and (a_DR, b_RF) are the
  factors of `lowrank_factors(W, r)`. Computed as gather_decode(W, idx, x[idx]) + (x a -
  gather_decode(a, idx, x[idx])) b, so it reads k rows of W and the rank-r factors, O(T (k F +
  D r + r F)) instead of O(T D F). With k = D, or with r = rank(W), y = x W exactly.
  Gradients reach x (values and low-rank term) and the k read rows of W; a, b are constants
  derived from W at inference.
  Zhang et al. 2025, "R-Sparse: Rank-Aware Activation Sparsity for Efficient LLM Inference".
  """
  a_DR, b_RF = w_lowrank_factors
  if x_TD.ndim != 2 or w_DF.ndim != 2 or x_TD.shape[1] != w_DF.shape[0]:
    raise ValueError(f"x_TD {x_TD.shape} and w_DF {w_DF.shape} must be [T, D] and [D, F]")
  if (a_DR.ndim != 2 or a_DR.shape[0] != w_DF.shape[0] or b_RF.shape != (a_DR.shape[1],
                                                                           w_DF.shape[1])):
    raise ValueError(
        f"w_lowrank_factors shapes {a_DR.shape}, {b_RF.shape}; allowed: ({w_DF.shape[0]}, r) "
        f"and (r, {w_DF.shape[1]}) as from lowrank_factors(w_DF, r)")
  _check_count("k", k, w_DF.shape[0])
  _, idx_TK = jax.lax.top_k(jax.lax.stop_gradient(jnp.abs(x_TD)), k)
  vals_TK = jnp.take_along_axis(x_TD, idx_TK, axis=1)
  a_DR, b_RF = a_DR.astype(x_TD.dtype), b_RF.astype(x_TD.dtype)
  rest_TR = x_TD @ a_DR - gather_decode(a_DR, idx_TK, vals_TK)
  return gather_decode(w_DF.astype(x_TD.dtype), idx_TK, vals_TK) + rest_TR @ b_RF


def prepare_inference(params: Any, rank: int) -> dict[str, Any]:
  """The "lowrank" collection of R-Sparse factors for every FFN params dict in `params`.

  Walks `params` (one FFN's params or a whole model's, boxed or not) and, for each dict whose
  keys are {"wi", "wo"} or {"wi", "wi_gate", "wo"} of 2-D arrays (DenseFFN's and RSparseFFN's
  params), returns at the same path {name: (a, b) = lowrank_factors(W_name, rank)}. Apply the
  model with `{"params": params, "lowrank": prepare_inference(params, rank)}`; entries for
  dense FFN layers are unused. Zhang et al. 2025, "R-Sparse" (factors fixed after training).
  """
  _check_count("rank", rank, None)
  return _ffn_factors(nn.meta.unbox(params), rank)


def _ffn_factors(tree: Any, rank: int) -> dict[str, Any]:
  if not isinstance(tree, Mapping):
    return {}
  keys = set(tree)
  if keys in ({"wi", "wo"}, set(LINEAR_WEIGHTS)) and all(
      getattr(tree[name], "ndim", 0) == 2 for name in keys):
    return {name: lowrank_factors(tree[name], rank) for name in keys}
  found = {name: _ffn_factors(child, rank) for name, child in tree.items()}
  return {name: factors for name, factors in found.items() if factors}


@FFNS.register("rsparse")
class RSparseFFN(nn.Module):
  """DenseFFN whose linear layers read only the top-|x| input channels plus a rank-r correction.

  Every linear layer y = x W (W_in, W_gate: D x F on x; W_out: F x D on the hidden units h)
  becomes y = x_s W + (x - x_s) a b with x_s the k largest-|x| channels per token and a b the
  rank-r SVD of W (`rsparse_linear`); k = round(in_keep D) for W_in / W_gate and
  round(hidden_keep F) for W_out. The factors are not params: `prepare_inference(params, rank)`
  derives them after training and the model is applied with them as the "lowrank" collection.
  Without that collection (training, `model.init`) the layer runs dense, equal to DenseFFN with
  the same params (R-Sparse is training-free). Params and sites ("in", "hidden", "out") as
  DenseFFN; activations gelu, swiglu, relu2 (relu(z)^2).
  Metrics: "active_fraction" (fraction of weight rows read exactly, over the layer's weights;
  1 when dense), "kept_mass" (fraction of sum x^2 held by the kept input channels of W_in).
  Zhang et al. 2025, "R-Sparse: Rank-Aware Activation Sparsity for Efficient LLM Inference".
  """

  d_model: int
  d_ff: int
  activation: str = "gelu"
  in_keep: float = 0.5
  hidden_keep: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    _check_activation(self.activation)
    k_in = _keep_count("in_keep", self.in_keep, self.d_model)
    k_hidden = _keep_count("hidden_keep", self.hidden_keep, self.d_ff)
    batch, length, _ = x_BTD.shape
    x_TD = Site(name="in")(x_BTD.astype(self.dtype)).reshape(batch * length, self.d_model)
    sparse = self.has_variable(LOWRANK_COLLECTION, "wi")
    linear = lambda name, v, k: (rsparse_linear(v, self._weight(name), self._factors(name), k)
                                 if sparse else v @ self._weight(name))
    h_TF = _hidden_site(_activate(self.activation, lambda name: linear(name, x_TD, k_in)),
                        batch, length)
    y_TD = linear("wo", h_TF, k_hidden)
    num_in = 2 if self.activation == "swiglu" else 1
    rows_read = num_in * k_in + k_hidden if sparse else num_in * self.d_model + self.d_ff
    metrics = {
        "active_fraction": jnp.asarray(rows_read / (num_in * self.d_model + self.d_ff)),
        "kept_mass": _top_mass(x_TD, k_in) if sparse else jnp.ones(()),
    }
    y_BTD = Site(name="out")(y_TD.reshape(batch, length, self.d_model))
    return y_BTD, {"losses": {}, "metrics": metrics}

  def _weight(self, name: str) -> jax.Array:
    shape, axes = ((self.d_ff, self.d_model), ("mlp", "embed")) if name == "wo" else (
        (self.d_model, self.d_ff), ("embed", "mlp"))
    return logical_param(self, name, nn.initializers.lecun_normal(), shape, axes, self.dtype)

  def _factors(self, name: str) -> LowRank:
    if not self.has_variable(LOWRANK_COLLECTION, name):
      raise ValueError(f"the {LOWRANK_COLLECTION!r} collection lacks {name!r} at "
                       f"{'/'.join(self.path)}; build it with prepare_inference(params, rank)")
    return tuple(self.get_variable(LOWRANK_COLLECTION, name))


# ------------------------------------------------------------------------------ N:M activations


def nm_activation_mask(h_TF: jax.Array, n: int, m: int) -> jax.Array:
  """Boolean mask keeping the n largest |h| in every group of m consecutive units of the last axis.

  mask[..., g m + j] = j is among the n largest |h[..., g m : (g + 1) m]| (ties: the lower
  index first). Exactly n True per group, density n / m.
  Haziza et al. 2025, "Accelerating Transformer Inference and Training with 2:4 Activation
  Sparsity"; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (N:M groups).
  """
  _check_nm(n, m, h_TF.shape[-1])
  _, idx_GN = _group_top(h_TF, n, m)
  hit_GNM = idx_GN[..., None] == jnp.arange(m)
  return jnp.any(hit_GNM, axis=-2).reshape(h_TF.shape)


def nm_pack(h_TF: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  """(vals_TK, idx_TK): the units `nm_activation_mask` keeps, packed, K = F n / m per token.

  idx_TK[t] lists the kept hidden indices (group by group, each group's in descending |h|);
  vals_TK = h[t, idx_TK[t]]. The compact form of the N:M-sparse activations.
  """
  if h_TF.ndim != 2:
    raise ValueError(f"h_TF must be [T, F]; got shape {h_TF.shape}")
  _check_nm(n, m, h_TF.shape[1])
  num_tokens, width = h_TF.shape
  vals_TGN, idx_TGN = _group_top(h_TF, n, m)
  idx_TGN = idx_TGN + m * jnp.arange(width // m, dtype=idx_TGN.dtype)[:, None]
  return vals_TGN.reshape(num_tokens, -1), idx_TGN.reshape(num_tokens, -1)


def nm_linear(h_TF: jax.Array, w_FD: jax.Array, n: int, m: int) -> jax.Array:
  """y = (h * nm_activation_mask(h, n, m)) W, reading only the F n / m kept rows of W per token.

  y[t] = sum_k vals[t, k] W[idx[t, k]] with (vals, idx) = nm_pack(h, n, m) (gather_decode):
  O(T K D) instead of O(T F D). Gradients flow to the kept units and the rows they read.
  """
  if w_FD.ndim != 2 or w_FD.shape[0] != h_TF.shape[-1]:
    raise ValueError(f"w_FD shape {w_FD.shape} must be [F, D] with F = {h_TF.shape[-1]}")
  vals_TK, idx_TK = nm_pack(h_TF, n, m)
  return gather_decode(w_FD.astype(h_TF.dtype), idx_TK, vals_TK)


def _group_top(h_TF: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  """(h values, in-group indices) of the n largest |h| of each group: [..., F / m, n] each."""
  h_GM = h_TF.reshape(*h_TF.shape[:-1], h_TF.shape[-1] // m, m)
  _, idx_GN = jax.lax.top_k(jax.lax.stop_gradient(jnp.abs(h_GM)), n)
  return jnp.take_along_axis(h_GM, idx_GN, axis=-1), idx_GN


@FFNS.register("nm_act")
class NMActivationFFN(nn.Module):
  """FFN whose hidden units are N:M sparse per token: n of every m consecutive units kept.

  h = act(x W_in) (gelu, relu2 = relu(z)^2, or swiglu silu(x W_gate) * x W_in);
  y = (h * mask) W_out with mask = nm_activation_mask(h, n, m) held constant, so gradients
  flow through the kept units only (straight-through for the selection). `implementation`
  "masked" multiplies the masked h densely (training); "gathered" packs the K = F n / m kept
  units per token (`nm_pack`) and reads only those rows of W_out (`nm_linear`; decode). Both
  give the same y. Params and sites ("in", "hidden" = h before the mask, "out") as DenseFFN.
  Metrics: "active_fraction" (n / m), "kept_mass" (fraction of sum h^2 the mask keeps).
  Haziza et al. 2025, "Accelerating Transformer Inference and Training with 2:4 Activation
  Sparsity" (there with relu2 and 2:4).
  """

  d_model: int
  d_ff: int
  activation: str = "relu2"
  n: int = 2
  m: int = 4
  implementation: str = "masked"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    _check_activation(self.activation)
    _check_nm(self.n, self.m, self.d_ff)
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation={self.implementation!r}; allowed: "
                       f"{', '.join(IMPLEMENTATIONS)}")
    batch, length, _ = x_BTD.shape
    x_TD = Site(name="in")(x_BTD.astype(self.dtype)).reshape(batch * length, self.d_model)
    h_TF = _hidden_site(_activate(self.activation, lambda name: x_TD @ self._weight(
        name, (self.d_model, self.d_ff), ("embed", "mlp"))), batch, length)
    w_FD = self._weight("wo", (self.d_ff, self.d_model), ("mlp", "embed"))
    if self.implementation == "gathered":
      kept_TK, idx_TK = nm_pack(h_TF, self.n, self.m)
      y_TD = gather_decode(w_FD, idx_TK, kept_TK)
    else:
      kept_TK = jnp.where(nm_activation_mask(h_TF, self.n, self.m), h_TF, 0)  # K = F here
      y_TD = kept_TK @ w_FD
    kept_sq = jnp.sum(jnp.square(kept_TK.astype(jnp.float32)))
    metrics = {
        "active_fraction": jnp.asarray(self.n / self.m),
        "kept_mass": kept_sq / jnp.maximum(jnp.sum(jnp.square(h_TF.astype(jnp.float32))), 1e-30),
    }
    y_BTD = Site(name="out")(y_TD.reshape(batch, length, self.d_model))
    return y_BTD, {"losses": {}, "metrics": metrics}

  def _weight(self, name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
    return logical_param(self, name, nn.initializers.lecun_normal(), shape, axes, self.dtype)


# ------------------------------------------------------------------------------ checks, helpers


def _activate(activation: str, project) -> jax.Array:
  """The hidden units act(x W_in) for gelu / relu2, silu(x W_gate) * x W_in for swiglu, with
  `project(name)` computing x W_name."""
  if activation == "gelu":
    return nn.gelu(project("wi"), approximate=True)
  if activation == "relu2":
    return jnp.square(jax.nn.relu(project("wi")))
  return nn.silu(project("wi_gate")) * project("wi")


def _hidden_site(h_TF: jax.Array, batch: int, length: int) -> jax.Array:
  """h_TF through the calling module's "hidden" site as [B, T, F], DenseFFN's layout (stats,
  probes and patching index its axis 1 by position)."""
  return Site(name="hidden")(h_TF.reshape(batch, length, -1)).reshape(h_TF.shape)


def _top_mass(x_TD: jax.Array, k: int) -> jax.Array:
  """Mean over tokens of the fraction of sum_d x^2 held by the k largest-|x| channels."""
  x_sq_TD = jnp.square(x_TD.astype(jnp.float32))
  kept_T = jnp.sum(jax.lax.top_k(x_sq_TD, k)[0], axis=-1)
  return jnp.mean(kept_T / jnp.maximum(jnp.sum(x_sq_TD, axis=-1), 1e-30))


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")


def _check_count(name: str, value: Any, upper: int | None) -> None:
  """A ValueError unless `value` is an int in [1, upper] (upper None: any positive int)."""
  bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
  if bad or (upper is not None and value > upper):
    allowed = "a positive int" if upper is None else f"an int in [1, {upper}]"
    raise ValueError(f"{name}={value!r}; allowed: {allowed}")


def _keep_count(name: str, fraction: float, width: int) -> int:
  """round(fraction width) clipped to >= 1, for a fraction in (0, 1]."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0 < fraction <= 1):
    raise ValueError(f"{name}={fraction!r}; allowed: a fraction in (0, 1]")
  return max(1, round(fraction * width))


def _check_nm(n: int, m: int, width: int) -> None:
  _check_count("m", m, None)
  _check_count("n", n, m)
  if width % m:
    raise ValueError(f"hidden width {width} is not a multiple of m={m}; allowed: F % m == 0")
