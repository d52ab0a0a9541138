"""CRISP-style concept unlearning: pick the latents a target corpus uses, then finetune them away.

Workflow: accumulate `feature_stats` of one SAE over a target corpus (the concept to remove) and
a benign corpus, `select_crisp_features` from them, then finetune the LM (e.g. LoRA) on
`crisp_loss`, computed from the SAE's latents of the finetuned model on target and benign text
and the frozen model's latents on the benign text. CRISP also keeps the final hidden states on
target text close to the frozen model's (a coherence term); that term is model-level, so the
task adds it beside this loss.
Ashuach et al. 2025, "CRISP: Persistent Concept Unlearning via Sparse Autoencoders".
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sae.analysis._checks import check_int, check_ndim, check_same


def _token_mask(mask_T: Any, num_tokens: int, name: str) -> jax.Array:
  if mask_T is None:
    return jnp.ones((num_tokens,), jnp.float32)
  check_same(f"{name}'s shape", jnp.shape(mask_T), (num_tokens,), "(T,) of the acts")
  return jnp.asarray(mask_T, jnp.float32)


def feature_stats(acts_TN: Any, mask_T: Any = None) -> tuple[jax.Array, jax.Array]:
  """(fire count [N], activation sum [N]) over the tokens where mask is true (all by default).

  count_n = sum_t m_t [a_tn > 0], sum_n = sum_t m_t a_tn; add them up over a corpus's batches.
  The mask drops padding and the BOS token, whose activations are atypical.
  """
  check_ndim("acts", acts_TN, 2, "(T, N)")
  acts_TN = jnp.asarray(acts_TN, jnp.float32)
  mask_T1 = _token_mask(mask_T, acts_TN.shape[0], "mask")[:, None]
  return jnp.sum(mask_T1 * (acts_TN > 0), axis=0), jnp.sum(mask_T1 * acts_TN, axis=0)


def select_crisp_features(count_target_N: Any, sum_target_N: Any, count_benign_N: Any,
                          sum_benign_N: Any, num_features: int, *, min_ratio: float = 3.0,
                          candidate_factor: int = 10) -> np.ndarray:
  """Ids of at most `num_features` latents that fire on the target corpus but not the benign one.

  Among latents that fire on either corpus, rank by count_target - count_benign (descending, ties
  to the lower id), take the first candidate_factor * num_features, keep those with
  sum_target / (sum_benign + 1) >= min_ratio, and return the first num_features (host int array).
  Ashuach et al. 2025, "CRISP: Persistent Concept Unlearning via Sparse Autoencoders".
  """
  stats = [np.asarray(x, np.float64)
           for x in (count_target_N, sum_target_N, count_benign_N, sum_benign_N)]
  for name, x in zip(("count_target", "sum_target", "count_benign", "sum_benign"), stats):
    check_same(f"{name}'s shape", x.shape, stats[0].shape, "count_target's shape")
  check_ndim("count_target", stats[0], 1, "(N,)")
  check_int("num_features", num_features, 1)
  check_int("candidate_factor", candidate_factor, 1)
  count_t, sum_t, count_b, sum_b = stats
  active_N = np.flatnonzero((count_t > 0) | (count_b > 0))
  ranked = active_N[np.argsort(-(count_t - count_b)[active_N], kind="stable")]
  candidates = ranked[:candidate_factor * num_features]
  keep = sum_t[candidates] / (sum_b[candidates] + 1.0) >= min_ratio
  return candidates[keep][:num_features]


def crisp_loss(acts_target_TN: Any, acts_benign_TN: Any, acts_benign_ref_TN: Any,
               feature_ids: Any, *, beta: float = 0.99, mask_target_T: Any = None,
               mask_benign_T: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(1 - beta) * suppress + beta * retain, and the two terms: (loss, {"suppress", "retain"}).

  For the chosen latents S: suppress = the mean of the positive activations a_ts, s in S, on the
  target tokens (0 when none fires), driving them to zero; retain = mean over benign tokens and S
  of (a_ts - a_ts^ref)^2 against the frozen model's latents, keeping the features intact where
  they mean something else. Tokens with a false mask (padding, BOS) are left out.
  Ashuach et al. 2025, "CRISP: Persistent Concept Unlearning via Sparse Autoencoders".
  """
  for name, x in (("acts_target", acts_target_TN), ("acts_benign", acts_benign_TN),
                  ("acts_benign_ref", acts_benign_ref_TN)):
    check_ndim(name, x, 2, "(T, N)")
  check_same("acts_benign_ref's shape", jnp.shape(acts_benign_ref_TN), jnp.shape(acts_benign_TN),
             "acts_benign's shape")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta!r}")
  ids_S = jnp.asarray(feature_ids)
  check_ndim("feature_ids", ids_S, 1, "(S,)")
  mask_target_T = _token_mask(mask_target_T, jnp.shape(acts_target_TN)[0], "mask_target")
  mask_benign_T = _token_mask(mask_benign_T, jnp.shape(acts_benign_TN)[0], "mask_benign")
  suppress, retain = _crisp_terms(
      *(jnp.asarray(x, jnp.float32) for x in (acts_target_TN, acts_benign_TN, acts_benign_ref_TN)),
      ids_S, mask_target_T, mask_benign_T)
  return (1.0 - beta) * suppress + beta * retain, {"suppress": suppress, "retain": retain}


@jax.jit
def _crisp_terms(acts_target_TN: jax.Array, acts_benign_TN: jax.Array,
                 acts_benign_ref_TN: jax.Array, ids_S: jax.Array, mask_target_T: jax.Array,
                 mask_benign_T: jax.Array) -> tuple[jax.Array, jax.Array]:
  target_TS = jnp.take(acts_target_TN, ids_S, axis=1)
  firing_TS = (target_TS > 0) & (mask_target_T[:, None] > 0)
  suppress = jnp.sum(jnp.where(firing_TS, target_TS, 0.0)) / jnp.maximum(jnp.sum(firing_TS), 1)
  benign_TS = jnp.take(acts_benign_TN, ids_S, axis=1)
  ref_TS = jax.lax.stop_gradient(jnp.take(acts_benign_ref_TN, ids_S, axis=1))
  mask_T1 = mask_benign_T[:, None]
  retain = (jnp.sum(mask_T1 * (benign_TS - ref_TS) ** 2)
            / jnp.maximum(jnp.sum(mask_T1) * ids_S.shape[0], 1.0))
  return suppress, retain
