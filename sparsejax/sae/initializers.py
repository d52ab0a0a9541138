"""SAE parameters and latent state at the start of training.

Params are a flat dict: "W_enc" [d_in, N], "b_enc" [N], "W_dec" [N, d_out], "b_dec" [d_out],
plus "log_threshold" [N] (kind "jumprelu") and "W_skip" [d_in, d_out] (skip transcoders).
"""
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sae.config import SAEConfig

Params = dict[str, jax.Array]


def param_shapes(config: SAEConfig) -> dict[str, tuple[int, ...]]:
  """The shape of every param of `config`'s dictionary."""
  d_in, n, d_out = config.d_in, config.num_latents, config.out_dim
  shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
  if config.kind == "jumprelu":
    shapes["log_threshold"] = (n,)
  if config.skip:
    shapes["W_skip"] = (d_in, d_out)
  return shapes


def unit_rows(w_ND: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm (rows of norm 0 stay 0)."""
  norms_N1 = jnp.linalg.norm(w_ND, axis=-1, keepdims=True)
  return w_ND / jnp.maximum(norms_N1, jnp.finfo(w_ND.dtype).tiny)


def geometric_median(points_TD: jax.Array, *, num_iters: int = 64, eps: float = 1e-6
                     ) -> jax.Array:
  """argmin_m sum_t ||p_t - m||, by Weiszfeld's iteration from the mean.

  m <- sum_t w_t p_t / sum_t w_t with w_t = 1 / max(||p_t - m||, eps).
  Weiszfeld 1937; used for b_dec by Bricken et al. 2023, "Towards Monosemanticity".
  """
  points_TD = jnp.asarray(points_TD, jnp.float32)

  def step(_, median_D):
    weights_T = 1.0 / jnp.maximum(jnp.linalg.norm(points_TD - median_D, axis=-1), eps)
    return weights_T @ points_TD / jnp.sum(weights_T)

  return jax.lax.fori_loop(0, num_iters, step, jnp.mean(points_TD, axis=0))


def init_params(key: jax.Array, config: SAEConfig, *, data_TD: jax.Array | None = None,
                target_TD: jax.Array | None = None) -> Params:
  """Fresh params: unit-norm random decoder rows, tied encoder, b_dec at the data's median.

  W_dec rows are uniform on the unit sphere; an autoencoder's encoder is W_enc = W_dec^T, a
  transcoder's has its own unit-norm random columns. b_dec is the geometric median of the
  reconstruction targets (`target_TD`, else `data_TD` for an autoencoder), or 0; b_enc = 0;
  log_threshold = log(init_threshold); W_skip = 0.
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (tied init, median b_dec);
  Paulo et al. 2025, "Transcoders Beat Sparse Autoencoders for Interpretability" (W_skip = 0).
  """
  dec_key, enc_key = jax.random.split(key)
  d_in, n, d_out = config.d_in, config.num_latents, config.out_dim
  w_dec_ND = unit_rows(jax.random.normal(dec_key, (n, d_out), jnp.float32))
  if config.transcoder:
    w_enc_DN = unit_rows(jax.random.normal(enc_key, (n, d_in), jnp.float32)).T
  else:
    w_enc_DN = w_dec_ND.T
  params = {"W_enc": w_enc_DN, "b_enc": jnp.zeros((n,), jnp.float32), "W_dec": w_dec_ND,
            "b_dec": _initial_b_dec(config, data_TD, target_TD)}
  if config.kind == "jumprelu":
    params["log_threshold"] = jnp.full((n,), np.log(config.init_threshold), jnp.float32)
  if config.skip:
    params["W_skip"] = jnp.zeros((d_in, d_out), jnp.float32)
  return params


def _initial_b_dec(config: SAEConfig, data_TD, target_TD) -> jax.Array:
  """The geometric median of what the dictionary reconstructs, when given; else zeros."""
  targets = target_TD if target_TD is not None else (None if config.transcoder else data_TD)
  if targets is None:
    return jnp.zeros((config.out_dim,), jnp.float32)
  _check_rows("target_TD" if target_TD is not None else "data_TD", targets, config.out_dim)
  return geometric_median(targets)


def init_state(config: SAEConfig) -> dict[str, jax.Array]:
  """Zeroed latent statistics: "tokens_since_fired" [N], "fire_count" [N], "tokens" [] (and
  "batchtopk_threshold" [] for kind "batchtopk"), all float32."""
  n = config.num_latents
  state = {"tokens_since_fired": jnp.zeros((n,), jnp.float32),
           "fire_count": jnp.zeros((n,), jnp.float32), "tokens": jnp.zeros((), jnp.float32)}
  if config.kind == "batchtopk":
    state["batchtopk_threshold"] = jnp.zeros((), jnp.float32)
  return state


def active_subspace(data_TD, *, d_active: int | None = None,
                    variance_fraction: float = 0.99) -> np.ndarray:
  """[r, D] orthonormal rows spanning the top-r principal directions of `data_TD`.

  The rows are the right singular vectors of the centred data for the r largest singular
  values; r = `d_active`, or the fewest directions whose variance reaches `variance_fraction`
  of the total. A host (NumPy) computation: r depends on the data.
  Wang et al. 2025, "Attention Layers Add Into Low-Dimensional Residual Subspaces".
  """
  data_TD = np.asarray(data_TD, np.float64)
  centred_TD = data_TD - data_TD.mean(axis=0)
  _, singular_R, v_RD = np.linalg.svd(centred_TD, full_matrices=False)
  if d_active is None:
    if not 0 < variance_fraction <= 1:
      raise ValueError(f"variance_fraction={variance_fraction} must be in (0, 1]")
    explained_R = np.cumsum(singular_R**2) / max(np.sum(singular_R**2), np.finfo(float).tiny)
    d_active = int(np.searchsorted(explained_R, variance_fraction * (1 - 1e-9)) + 1)
  if not 1 <= d_active <= v_RD.shape[0]:
    raise ValueError(f"d_active={d_active} must be in [1, {v_RD.shape[0]}] (the data's rank "
                     f"bound min(T, D))")
  return v_RD[:d_active]


def init_active_subspace(key: jax.Array, config: SAEConfig, data_TD, *, target_TD=None,
                         d_active: int | None = None, variance_fraction: float = 0.99) -> Params:
  """`init_params` with decoder atoms drawn inside the active subspace of the activations.

  W_dec[n] = normalize(g_n V_r) with g_n ~ N(0, I_r) and V_r the [r, D] principal directions of
  the reconstruction targets (`active_subspace`), so no atom starts in a direction the data
  never visits (fewer dead latents); an autoencoder's W_enc = W_dec^T.
  Wang et al. 2025, "Attention Layers Add Into Low-Dimensional Residual Subspaces" (Active
  Subspace Initialization).
  """
  targets = target_TD if target_TD is not None else data_TD
  if config.transcoder and target_TD is None:
    raise ValueError("a transcoder's atoms live in the target space: pass target_TD")
  _check_rows("target_TD" if target_TD is not None else "data_TD", targets, config.out_dim)
  params_key, atoms_key = jax.random.split(key)
  params = init_params(params_key, config, data_TD=data_TD, target_TD=target_TD)
  v_RD = jnp.asarray(active_subspace(targets, d_active=d_active,
                                     variance_fraction=variance_fraction), jnp.float32)
  g_NR = jax.random.normal(atoms_key, (config.num_latents, v_RD.shape[0]), jnp.float32)
  params["W_dec"] = unit_rows(g_NR @ v_RD)
  if not config.transcoder:
    params["W_enc"] = params["W_dec"].T
  return params


def _check_rows(name: str, array, width: int) -> None:
  if np.ndim(array) != 2 or np.shape(array)[1] != width or np.shape(array)[0] < 1:
    raise ValueError(f"{name} must have shape [T >= 1, {width}], got {np.shape(array)}")
