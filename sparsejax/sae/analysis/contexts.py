"""Where latents fire on a token stream: top-activating contexts and a polysemy probe."""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.sae.analysis._checks import check_int, check_ndim, check_same


def top_activating_contexts(acts_TN: Any, tokens_T: Any, latent: Any, k: int, window: int, *,
                            pad_id: int = -1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k strongest firings of one latent: (contexts [k, 2 window + 1], values [k], positions [k]).

  positions = the k tokens t of largest acts[t, latent] (descending; ties to the earlier token),
  contexts[j] = tokens[positions[j] - window .. positions[j] + window], with `pad_id` past either
  end of the stream, so the firing token sits at column `window`. `latent` may be traced:
  `jax.vmap` over latent ids gives every latent's contexts at once.
  Bricken et al. 2023, "Towards Monosemanticity" (feature dashboards of top activations).
  """
  check_ndim("acts", acts_TN, 2, "(T, N)")
  check_ndim("tokens", tokens_T, 1, "(T,)")
  num_tokens, num_latents = jnp.shape(acts_TN)
  check_same("tokens' T", jnp.shape(tokens_T)[0], num_tokens, "acts' T")
  if isinstance(latent, int):
    check_int("latent", latent, 0, num_latents - 1)
  check_int("k", k, 1, num_tokens)
  check_int("window", window, 0)
  return _top_contexts(jnp.asarray(acts_TN), jnp.asarray(tokens_T), latent, k, window, pad_id)


@functools.partial(jax.jit, static_argnames=("k", "window", "pad_id"))
def _top_contexts(acts_TN: jax.Array, tokens_T: jax.Array, latent: Any, k: int, window: int,
                  pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  num_tokens = tokens_T.shape[0]
  values_K, positions_K = jax.lax.top_k(acts_TN[:, latent], k)
  where_KW = positions_K[:, None] + jnp.arange(-window, window + 1)[None, :]
  inside_KW = (where_KW >= 0) & (where_KW < num_tokens)
  contexts_KW = jnp.where(inside_KW, tokens_T[jnp.clip(where_KW, 0, num_tokens - 1)],
                          jnp.asarray(pad_id, tokens_T.dtype))
  return contexts_KW, values_K, positions_K


def polysemy(acts_TN: Any, context_ids_T: Any, num_contexts: int) -> tuple[jax.Array, jax.Array]:
  """How many kinds of context each latent fires on: (entropy [N] in nats, effective count [N]).

  Each token t carries a context class c_t in [0, C): the token at t, the next token, a word
  sense, or the spherical k-means cluster of the residual at t. A latent's activation mass over
  the classes, p_nc = sum_{t: c_t = c} a_tn / sum_t a_tn, has entropy H_n = -sum_c p_nc log p_nc
  and effective count exp(H_n): 1 for a latent that fires in a single class (monosemantic with
  respect to that labelling), m for one spread evenly over m classes. A latent that never fires
  gets H = 0 and count 0. To weight firings equally, pass `acts_TN > 0`. Memory is [C, N]: slice
  the latents of interest when C is a vocabulary.
  Bricken et al. 2023, "Towards Monosemanticity" (activation-weighted context distributions);
  Minegishi et al. 2025, "Rethinking Evaluation of Sparse Autoencoders through the Representation
  of Polysemous Words".
  """
  check_ndim("acts", acts_TN, 2, "(T, N)")
  check_ndim("context_ids", context_ids_T, 1, "(T,)")
  check_same("context_ids' T", jnp.shape(context_ids_T)[0], jnp.shape(acts_TN)[0], "acts' T")
  check_int("num_contexts", num_contexts, 1)
  acts_TN = jnp.asarray(acts_TN, jnp.float32)
  if not jnp.issubdtype(jnp.asarray(context_ids_T).dtype, jnp.integer):
    raise ValueError(f"context_ids must be integer classes in [0, {num_contexts}), got dtype "
                     f"{jnp.asarray(context_ids_T).dtype}")
  return _polysemy(acts_TN, jnp.asarray(context_ids_T), num_contexts)


@functools.partial(jax.jit, static_argnames="num_contexts")
def _polysemy(acts_TN: jax.Array, context_ids_T: jax.Array,
              num_contexts: int) -> tuple[jax.Array, jax.Array]:
  mass_CN = jax.ops.segment_sum(acts_TN, context_ids_T, num_segments=num_contexts)
  total_N = jnp.sum(mass_CN, axis=0)
  p_CN = mass_CN / jnp.where(total_N > 0, total_N, 1.0)
  entropy_N = -jnp.sum(jnp.where(p_CN > 0, p_CN * jnp.log(jnp.where(p_CN > 0, p_CN, 1.0)), 0.0),
                       axis=0)
  return entropy_N, jnp.where(total_N > 0, jnp.exp(entropy_N), 0.0)
