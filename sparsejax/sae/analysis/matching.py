"""Feature matching between SAE dictionaries: Hungarian matching of decoder atoms, SAE Match.

A permutation `perm` maps the latents of SAE a to those of SAE b: latent i of a is matched to
latent perm[i] of b, so `permute_latents(params_b, perm)` puts b's match of a's latent i at
index i. Chains compose by indexing: a -> b -> c is `perm_bc[perm_ab]`. Matching runs on the host
(SciPy's Hungarian solver, float64) and returns NumPy arrays.
"""
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from sparsejax.sae.analysis._checks import check_ndim, check_same

# Per-latent params and the axis that indexes the latents; the other params are shared.
LATENT_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "log_threshold": 0}
SHARED_PARAMS = ("b_dec", "W_skip")


def cosine_matrix(a_ND: Any, b_MD: Any) -> np.ndarray:
  """cos[i, j] = <a_i, b_j> / (|a_i| |b_j|), float64 [N, M]; a zero row has cosine 0."""
  a_ND, b_MD = (np.asarray(x, np.float64) for x in (a_ND, b_MD))
  return _unit_rows(a_ND) @ _unit_rows(b_MD).T


def _unit_rows(x_ND: np.ndarray) -> np.ndarray:
  norms_N = np.linalg.norm(x_ND, axis=1, keepdims=True)
  return x_ND / np.where(norms_N > 0, norms_N, 1.0)


def _check_dictionaries(W_dec_a_ND: Any, W_dec_b_MD: Any) -> None:
  check_ndim("W_dec_a", W_dec_a_ND, 2, "(N, D)")
  check_ndim("W_dec_b", W_dec_b_MD, 2, "(M, D)")
  check_same("W_dec_b's D", np.shape(W_dec_b_MD)[1], np.shape(W_dec_a_ND)[1], "W_dec_a's D")
  if np.shape(W_dec_a_ND)[0] > np.shape(W_dec_b_MD)[0]:
    raise ValueError(
        f"W_dec_a has {np.shape(W_dec_a_ND)[0]} atoms, more than W_dec_b's "
        f"{np.shape(W_dec_b_MD)[0]}; pass the smaller dictionary first so every atom gets a match")


def _assign(cost_NM: np.ndarray) -> np.ndarray:
  """perm[i] = the column matched to row i by the minimum-cost one-to-one assignment (N <= M)."""
  rows_N, cols_N = scipy.optimize.linear_sum_assignment(cost_NM)
  return cols_N[np.argsort(rows_N)]


def match_features(W_dec_a_ND: Any, W_dec_b_MD: Any) -> tuple[np.ndarray, np.ndarray]:
  """One-to-one matching of atoms maximising total cosine: (perm [N], matched cosines [N]).

  perm = argmax over injections pi: [N] -> [M] of sum_i cos(a_i, b_pi(i)), solved exactly by the
  Hungarian algorithm on the cost -cos (N <= M). Rows are the decoder atoms; the mean matched
  cosine measures how much two dictionaries (seeds, runs, models) share.
  Paulo & Belrose 2025, "Sparse Autoencoders Trained on the Same Data Learn Different Features";
  Kuhn 1955, "The Hungarian Method for the Assignment Problem".
  """
  _check_dictionaries(W_dec_a_ND, W_dec_b_MD)
  cos_NM = cosine_matrix(W_dec_a_ND, W_dec_b_MD)
  perm_N = _assign(-cos_NM)
  return perm_N, cos_NM[np.arange(len(perm_N)), perm_N]


def fold_scales(params: Mapping[str, Any]) -> jax.Array:
  """s_N: the JumpReLU threshold exp(log_threshold) when present, else the encoder column norms.

  Zero encoder columns (dead latents) get s = 1. See `fold_parameters`.
  """
  if "log_threshold" in params:
    return jnp.exp(jnp.asarray(params["log_threshold"]))
  norms_N = jnp.linalg.norm(jnp.asarray(params["W_enc"]), axis=0)
  return jnp.where(norms_N > 0, norms_N, 1.0)


def fold_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
  """Params with each latent's scale s_n moved from the encoder into the decoder.

  W_enc[:, n] / s_n, b_enc[n] / s_n, W_dec[n] * s_n, and a JumpReLU threshold of 1
  (log_threshold = 0). With s = theta this is exact for JumpReLU, since
  z H(z - theta) = theta (z / theta) H(z / theta - 1); with s = |W_enc[:, n]| it is exact for ReLU
  (ReLU(z) = s ReLU(z / s)). A TopK encoder ranks the rescaled pre-activations differently, so for
  TopK the folded params serve matching, not inference. After folding, a decoder row carries the
  feature's scale, so atoms of SAEs trained at different layers compare on equal terms.
  Balagansky et al. 2025, "Mechanistic Permutability: Match Features Across Layers" (SAE Match).
  """
  scale_N = fold_scales(params)
  folded = dict(params)
  folded["W_enc"] = jnp.asarray(params["W_enc"]) / scale_N
  folded["b_enc"] = jnp.asarray(params["b_enc"]) / scale_N
  folded["W_dec"] = jnp.asarray(params["W_dec"]) * scale_N[:, None]
  if "log_threshold" in params:
    folded["log_threshold"] = jnp.zeros_like(jnp.asarray(params["log_threshold"]))
  return folded


def sae_match(params_a: Mapping[str, Any],
              params_b: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """SAE Match of two SAEs (e.g. adjacent layers): (perm [N], matched atom cosines [N]).

  perm = argmin over permutations pi of sum_i |f(W_dec^a)_i - f(W_dec^b)_pi(i)|^2, where f folds
  each latent's threshold (or encoder norm) into its decoder row (`fold_parameters`); the
  assignment is exact (Hungarian). Data-free: only the weights are read. The cosines are those
  of the matched atoms (scale-free, so unchanged by folding).
  Balagansky et al. 2025, "Mechanistic Permutability: Match Features Across Layers".
  """
  W_a_ND = np.asarray(fold_parameters(params_a)["W_dec"], np.float64)
  W_b_MD = np.asarray(fold_parameters(params_b)["W_dec"], np.float64)
  _check_dictionaries(W_a_ND, W_b_MD)
  sq_dist_NM = (np.sum(W_a_ND**2, axis=1)[:, None] + np.sum(W_b_MD**2, axis=1)[None, :]
                - 2.0 * W_a_ND @ W_b_MD.T)
  perm_N = _assign(sq_dist_NM)
  return perm_N, np.sum(_unit_rows(W_a_ND) * _unit_rows(W_b_MD[perm_N]), axis=1)


def match_layers(params_per_layer: Sequence[Mapping[str, Any]]
                 ) -> tuple[list[np.ndarray], np.ndarray]:
  """SAE Match of every adjacent pair of L layers: (L - 1 perms, mean matched cosine [L - 1]).

  Entry l matches layer l to layer l + 1 (`sae_match`); a latent's path through the layers is
  i, perms[0][i], perms[1][perms[0][i]], ...  A high mean cosine means the features persist.
  Balagansky et al. 2025, "Mechanistic Permutability: Match Features Across Layers".
  """
  if len(params_per_layer) < 2:
    raise ValueError(f"params_per_layer must hold at least 2 SAEs, got {len(params_per_layer)}")
  perms, mean_cosines = [], []
  for params_a, params_b in zip(params_per_layer[:-1], params_per_layer[1:]):
    perm_N, cos_N = sae_match(params_a, params_b)
    perms.append(perm_N)
    mean_cosines.append(np.mean(cos_N))
  return perms, np.asarray(mean_cosines)


def permute_latents(params: Mapping[str, Any], perm: Any) -> dict[str, Any]:
  """Params whose latent i is the old latent perm[i]; every per-latent param moves together.

  W_enc[:, perm], b_enc[perm], W_dec[perm], log_threshold[perm]; b_dec and W_skip are shared and
  kept. The permuted SAE computes the same reconstruction, with acts_new[:, i] = acts[:, perm[i]].
  `perm` is a host integer array holding each of 0 .. N - 1 once.
  """
  unknown = sorted(set(params) - set(LATENT_AXIS) - set(SHARED_PARAMS))
  if unknown:
    raise ValueError(f"params has keys {unknown} that permute_latents does not know; known: "
                     f"{sorted(LATENT_AXIS) + list(SHARED_PARAMS)}")
  num_latents = np.shape(params["W_dec"])[0]
  perm_N = np.asarray(perm)
  if perm_N.shape != (num_latents,) or not np.array_equal(np.sort(perm_N), np.arange(num_latents)):
    raise ValueError(f"perm must be a permutation of 0 .. {num_latents - 1}, got "
                     f"{np.array2string(perm_N, threshold=12)}")
  return {name: (jnp.take(jnp.asarray(value), perm_N, axis=LATENT_AXIS[name])
                 if name in LATENT_AXIS else value)
          for name, value in params.items()}
