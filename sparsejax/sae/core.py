"""Sparse autoencoders and transcoders as pure functions: encode -> sparse code -> decode -> aux.

`sae_apply(params, x_TD, config, state=...)` runs a whole dictionary on T tokens:

  pre_TN = (x - b_dec) W_enc + b_enc        (an autoencoder subtracts b_dec; a transcoder not)
  acts_TN = activation(pre_TN)              (config.kind, see `encode`)
  x_hat_TD = acts_TN W_dec + b_dec (+ x W_skip)
  aux = penalties (l1, l0, auxk, matryoshka, orthogonality) and metrics (l0, dead_fraction)

The top-k kinds decode through `sparsejax.ops.gather_decode` (cost O(T k D), not O(T N D)).
The reconstruction loss itself (FVU, `metrics.fvu`) belongs to the caller. Params are the
plain dict of `initializers.init_params`; the latent state ("tokens_since_fired", "fire_count",
"tokens", "batchtopk_threshold") is an explicit dict from `initializers.init_state`. Everything
is jit-safe; `config` is static.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.ops import gather_decode
from sparsejax.sae import activations
from sparsejax.sae import metrics as sae_metrics
from sparsejax.sae import penalties
from sparsejax.sae.config import SAEConfig
from sparsejax.sae.config import TOPK_KINDS
from sparsejax.sae.initializers import init_params  # noqa: F401 (part of the core API)
from sparsejax.sae.initializers import init_state  # noqa: F401 (part of the core API)

Params = dict[str, jax.Array]
State = dict[str, jax.Array]
Info = dict[str, Any]


def pre_activations(params: Params, x_TD: jax.Array, config: SAEConfig) -> jax.Array:
  """z = (x - b_dec) W_enc + b_enc for an autoencoder, x W_enc + b_enc for a transcoder."""
  x_TD = _check_rows("x_TD", x_TD, config.d_in)
  if not config.transcoder:
    x_TD = x_TD - params["b_dec"]
  return x_TD @ params["W_enc"] + params["b_enc"]


def encode(params: Params, x_TD: jax.Array, config: SAEConfig, *, training: bool = False,
           state: State | None = None) -> tuple[jax.Array, jax.Array, Info]:
  """(acts_TN, pre_acts_TN, info): the latent activations of T tokens.

  With z = `pre_activations`:
    relu:      a = relu(z)
    threshold: a = z 1[z > t], t = config.threshold (fixed, global)
    jumprelu:  a = z 1[z > theta_n], theta = exp(log_threshold), straight-through gradient
    topk:      a = relu(z) on each token's k largest z_tn, 0 elsewhere
    batchtopk: training: relu(z) on the k T largest z_tn of the batch; inference: z 1[z > theta]
               with the single threshold theta = state["batchtopk_threshold"]
  info holds "idx_TK", "vals_TK" for topk, and "token_S", "latent_S", "vals_S" (S = k T kept
  entries) for batchtopk in training.
  Relu: Bricken et al. 2023, "Towards Monosemanticity". Threshold: Hu et al. 2025, "Towards
  Atoms of Large Language Models" (threshold-activated SAEs). JumpReLU: Rajamanoharan et al.
  2024, "Jumping Ahead". TopK: Gao et al. 2024, "Scaling and evaluating sparse autoencoders".
  BatchTopK: Bussmann et al. 2024, "BatchTopK Sparse Autoencoders".
  """
  pre_TN = pre_activations(params, x_TD, config)
  kind = config.kind
  if kind == "relu":
    return jax.nn.relu(pre_TN), pre_TN, {}
  if kind == "threshold":
    return jnp.where(pre_TN > config.threshold, pre_TN, 0.0), pre_TN, {}
  if kind == "jumprelu":
    threshold_N = jnp.exp(params["log_threshold"])
    return activations.jumprelu(pre_TN, threshold_N, config.bandwidth), pre_TN, {}
  if kind == "topk":
    idx_TK, vals_TK = activations.top_k_latents(pre_TN, config.k, approx=config.approx)
    rows_T1 = jnp.arange(pre_TN.shape[0])[:, None]
    acts_TN = jnp.zeros_like(pre_TN).at[rows_T1, idx_TK].set(vals_TK)
    return acts_TN, pre_TN, {"idx_TK": idx_TK, "vals_TK": vals_TK}
  if training:
    token_S, latent_S, vals_S = activations.batch_top_k_latents(pre_TN, config.k,
                                                                approx=config.approx)
    acts_TN = jnp.zeros_like(pre_TN).at[token_S, latent_S].set(vals_S)
    return acts_TN, pre_TN, {"token_S": token_S, "latent_S": latent_S, "vals_S": vals_S}
  if state is None or "batchtopk_threshold" not in state:
    raise ValueError("kind='batchtopk' at inference (training=False) needs state with "
                     "'batchtopk_threshold' (from init_state and training)")
  return jnp.where(pre_TN > state["batchtopk_threshold"], pre_TN, 0.0), pre_TN, {}


def decode(params: Params, acts_TN: jax.Array, config: SAEConfig, *,
           x_TD: jax.Array | None = None) -> jax.Array:
  """x_hat = a W_dec + b_dec (+ x W_skip for a skip transcoder, which needs `x_TD`)."""
  _check_rows("acts_TN", acts_TN, config.num_latents)
  return _finish_decode(params, acts_TN @ params["W_dec"], config, x_TD)


def _finish_decode(params: Params, y_TD: jax.Array, config: SAEConfig,
                   x_TD: jax.Array | None) -> jax.Array:
  """y + b_dec (+ x W_skip)."""
  y_TD = y_TD + params["b_dec"]
  if config.skip:
    if x_TD is None:
      raise ValueError("a skip transcoder (skip=True) decodes x W_skip too: pass x_TD")
    y_TD = y_TD + _check_rows("x_TD", x_TD, config.d_in) @ params["W_skip"]
  return y_TD


def _decode_code(params: Params, acts_TN: jax.Array, info: Info, config: SAEConfig,
                 x_TD: jax.Array, prefix: int | None = None) -> jax.Array:
  """The reconstruction from latents [0, prefix) (all when None), through the cheapest path:
  gather_decode for topk, a scatter of the kept entries for batchtopk training, else dense."""
  w_dec_ND = params["W_dec"]
  keep = lambda idx, vals: vals if prefix is None else jnp.where(idx < prefix, vals, 0.0)
  if "idx_TK" in info:
    y_TD = gather_decode(w_dec_ND, info["idx_TK"], keep(info["idx_TK"], info["vals_TK"]))
  elif "latent_S" in info:
    vals_S = keep(info["latent_S"], info["vals_S"])
    rows_SD = jnp.take(w_dec_ND, info["latent_S"], axis=0) * vals_S[:, None]
    y_TD = jax.ops.segment_sum(rows_SD, info["token_S"], num_segments=acts_TN.shape[0])
  else:
    m = w_dec_ND.shape[0] if prefix is None else prefix
    y_TD = acts_TN[:, :m] @ w_dec_ND[:m]
  return _finish_decode(params, y_TD, config, x_TD)


def sae_apply(params: Params, x_TD: jax.Array, config: SAEConfig, *,
              target_TD: jax.Array | None = None, state: State | None = None,
              training: bool = False, rng: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, Aux, State | None]:
  """(x_hat_TD, acts_TN, aux, new_state): the dictionary on T tokens, with its penalties.

  aux["losses"] (each already weighted by its coefficient, present when that is > 0):
    "l1":   l1_coeff mean_t sum_n a_tn ||W_dec[n]||  (`penalties.decoder_norm_l1`)
    "l0":   l0_coeff mean_t sum_n H(z_tn - theta_n), straight-through to theta (jumprelu)
    "auxk": auxk_coeff ||e - e_hat||^2 / ||e - mean e||^2, e = y - x_hat (held fixed) and
            e_hat = the top auxk_latents dead latents' decode without b_dec (top-k kinds; needs
            `state`; 0 while no latent is dead). Gao et al. 2024.
    "matryoshka": matryoshka_coeff sum_{m < N} FVU(x_hat^{[0, m)}, y) over the prefixes m in
            config.matryoshka below N (the full dictionary's FVU is the caller's loss). Bussmann
            et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders";
            Nabeshima 2024, "Matryoshka Sparse Autoencoders".
    "orthogonality": orthogonality_coeff `penalties.orthogonality_penalty(W_dec, K, key=rng)`.
  y is `target_TD` (a transcoder's target), else x for an autoencoder; a transcoder called
  without a target (e.g. at inference) has no auxk / matryoshka loss.
  aux["metrics"]: "l0" (mean active latents per token), "dead_fraction" (with `state`),
  "batchtopk_threshold" (batchtopk with `state`).
  new_state (None without `state`): tokens_since_fired reset to 0 for latents that fired in
  this batch, else increased by T; fire_count += tokens each latent fired on; tokens += T; in
  training, batchtopk_threshold <- (1 - r) theta + r min(kept positive activations), r =
  threshold_ema (the first batch sets it).
  """
  x_TD = _check_rows("x_TD", x_TD, config.d_in)
  acts_TN, pre_TN, info = encode(params, x_TD, config, training=training, state=state)
  x_hat_TD = _decode_code(params, acts_TN, info, config, x_TD)
  if target_TD is not None:
    target_TD = _check_rows("target_TD", target_TD, config.out_dim)
  elif not config.transcoder:
    target_TD = x_TD
  losses = {}
  if config.l1_coeff > 0:
    losses["l1"] = config.l1_coeff * penalties.decoder_norm_l1(acts_TN, params["W_dec"])
  if config.l0_coeff > 0:
    losses["l0"] = config.l0_coeff * _l0_penalty(params, pre_TN, config)
  if (config.kind in TOPK_KINDS and config.auxk_coeff > 0 and state is not None
      and target_TD is not None):
    dead_N = state["tokens_since_fired"] >= config.dead_after_tokens
    losses["auxk"] = config.auxk_coeff * _auxk_term(params, pre_TN, dead_N, target_TD - x_hat_TD,
                                                    config)
  prefixes = [m for m in config.matryoshka if m < config.num_latents]
  if prefixes and target_TD is not None:
    prefix_fvus = [sae_metrics.fvu(_decode_code(params, acts_TN, info, config, x_TD, m), target_TD)
                   for m in prefixes]
    losses["matryoshka"] = config.matryoshka_coeff * sum(prefix_fvus)
  if config.orthogonality_coeff > 0:
    losses["orthogonality"] = config.orthogonality_coeff * penalties.orthogonality_penalty(
        params["W_dec"], config.orthogonality_chunks, key=rng)
  metrics = {"l0": jnp.mean(jnp.sum(acts_TN != 0, axis=-1, dtype=jnp.float32))}
  new_state = None
  if state is not None:
    new_state = update_state(state, acts_TN, info, config, training=training)
    metrics["dead_fraction"] = jnp.mean(
        (new_state["tokens_since_fired"] >= config.dead_after_tokens).astype(jnp.float32))
    if "batchtopk_threshold" in new_state:
      metrics["batchtopk_threshold"] = new_state["batchtopk_threshold"]
  return x_hat_TD, acts_TN, {"losses": losses, "metrics": metrics}, new_state


def _l0_penalty(params: Params, pre_TN: jax.Array, config: SAEConfig) -> jax.Array:
  """mean_t sum_n H(z_tn - theta_n), with the straight-through threshold gradient."""
  threshold_N = jnp.exp(params["log_threshold"])
  step_TN = activations.heaviside_step(pre_TN, threshold_N, config.bandwidth)
  return jnp.mean(jnp.sum(step_TN, axis=-1))


def _auxk_term(params: Params, pre_TN: jax.Array, dead_N: jax.Array, residual_TD: jax.Array,
               config: SAEConfig) -> jax.Array:
  """`penalties.auxk_loss` of the decode of each token's top auxk_latents dead latents."""
  dead_pre_TN = jnp.where(dead_N, pre_TN, -jnp.inf)
  idx_TK, vals_TK = activations.top_k_latents(dead_pre_TN, config.auxk_latents,
                                              approx=config.approx)
  dead_recon_TD = gather_decode(params["W_dec"], idx_TK, vals_TK)
  return jnp.where(jnp.any(dead_N), penalties.auxk_loss(residual_TD, dead_recon_TD), 0.0)


def update_state(state: State, acts_TN: jax.Array, info: Info, config: SAEConfig, *,
                 training: bool) -> State:
  """The latent statistics after a batch with activations `acts_TN` (see `sae_apply`)."""
  num_tokens = jnp.float32(acts_TN.shape[0])
  fires_N = jnp.sum(acts_TN != 0, axis=0, dtype=jnp.float32)
  new_state = dict(state)
  new_state["tokens_since_fired"] = jnp.where(fires_N > 0, 0.0,
                                              state["tokens_since_fired"] + num_tokens)
  new_state["fire_count"] = state["fire_count"] + fires_N
  new_state["tokens"] = state["tokens"] + num_tokens
  if training and "vals_S" in info:
    new_state["batchtopk_threshold"] = _threshold_ema(state, info["vals_S"], config)
  return new_state


def _threshold_ema(state: State, vals_S: jax.Array, config: SAEConfig) -> jax.Array:
  """The EMA of the smallest positive kept activation (kept as is when none is positive)."""
  smallest = jnp.min(jnp.where(vals_S > 0, vals_S, jnp.inf))
  old = state["batchtopk_threshold"]
  blended = jnp.where(state["tokens"] > 0,
                      (1 - config.threshold_ema) * old + config.threshold_ema * smallest, smallest)
  return jnp.where(jnp.isfinite(smallest), blended, old)


def batchtopk_to_jumprelu(params: Params, state: State, config: SAEConfig
                          ) -> tuple[Params, SAEConfig]:
  """A "jumprelu" dictionary computing what a trained BatchTopK one computes at inference.

  Every latent gets the single threshold theta = state["batchtopk_threshold"]:
  log_threshold_n = log(theta), so z 1[z > exp(log theta)] = z 1[z > theta] (up to the rounding
  of exp(log theta)). The JumpReLU config has l0_coeff = 0 (thresholds stay as exported).
  A host function: theta must be concrete and > 0 (train the BatchTopK dictionary first).
  Bussmann et al. 2024, "BatchTopK Sparse Autoencoders" (inference with a global threshold).
  """
  if config.kind != "batchtopk":
    raise ValueError(f"config.kind={config.kind!r}; batchtopk_to_jumprelu needs 'batchtopk'")
  threshold = float(np.asarray(state["batchtopk_threshold"]))
  if not threshold > 0:
    raise ValueError(f"state['batchtopk_threshold']={threshold} must be > 0; it is set by "
                     f"training (sae_apply with training=True)")
  jumprelu_params = dict(params)
  jumprelu_params["log_threshold"] = jnp.full((config.num_latents,), np.log(threshold),
                                              jnp.float32)
  return jumprelu_params, dataclasses.replace(config, kind="jumprelu", l0_coeff=0.0)


def _check_rows(name: str, array: jax.Array, width: int) -> jax.Array:
  """`array` as float32 after checking it is [T, width]."""
  if np.ndim(array) != 2 or np.shape(array)[1] != width:
    raise ValueError(f"{name} must have shape [T, {width}], got {np.shape(array)}")
  return jnp.asarray(array, jnp.float32)
