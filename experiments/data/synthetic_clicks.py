"""A deterministic synthetic click-through dataset: id bags drawn from Zipf laws, a planted
logistic model over feature crosses decides the clicks (generated in code, no download).

An example has F = NUM_FIELDS categorical fields; field f holds a bag of 1..L (L = BAG_SIZE,
uniform) raw ids from a vocabulary of CARDINALITY ids with Zipf popularity p(rank r) ∝
(r + 1)^-ZIPF_EXPONENT (a field's ranks map to ids by a seeded permutation); unused slots are
-1. Each id i of field f has a planted weight a_f[i] ~ N(0, FIRST_ORDER_SCALE^2) and a latent
z_f[i] ~ N(0, I_RANK); a bag's values are its ids' means ā_f and z̄_f, and the click
probability is

    p = sigmoid(BIAS + sum_f ā_f + CROSS_SCALE sum_{f<g} s_fg <z̄_f, z̄_g> / sqrt(RANK)),

s_fg ~ N(0, 1) one strength per field pair (feature crosses, the part a per-field linear model
cannot fit); click ~ Bernoulli(p). The planted model comes from
`np.random.default_rng([SEED, 0])` and the examples from `default_rng([SEED, 1])`, so the data
are identical on every machine; the first NUM_TRAIN examples are "train", the next NUM_TEST
"test". `oracle_auc(split)` is the AUC of the planted p itself: the
ceiling a learned model approaches.

A split is a `digits.ArrayDataset` (inputs int32 [N, F, L] raw ids, labels int32 [N] clicks),
so `ds[i]` = {"inputs": int32 [F, L], "targets": int32 [], "weights": float32 [] = 1}, and
`digits.eval_batches` gives its padded eval batches.
"""
import functools

import numpy as np

from experiments.data import digits

NAME = "synthetic_clicks"
SPLITS = ("train", "test")
SEED = 0
NUM_FIELDS = 8
BAG_SIZE = 3
CARDINALITY = 2000
ZIPF_EXPONENT = 1.1
RANK = 4
BIAS = -1.0
FIRST_ORDER_SCALE = 0.5
CROSS_SCALE = 1.0
NUM_TRAIN = 400_000
NUM_TEST = 20_000


def planted_model(seed: int = SEED) -> dict[str, np.ndarray]:
  """The planted parameters, from rng([seed, 0]) (the examples never change them):
  rank_to_id int [F, CARDINALITY] (popularity rank -> raw id), weights a [F, CARDINALITY],
  latents z [F, CARDINALITY, RANK], strengths s [F, F] (only f < g used)."""
  rng = np.random.default_rng([seed, 0])
  return {
      "rank_to_id": np.stack([rng.permutation(CARDINALITY) for _ in range(NUM_FIELDS)]),
      "weights": rng.normal(0.0, FIRST_ORDER_SCALE, (NUM_FIELDS, CARDINALITY)),
      "latents": rng.normal(0.0, 1.0, (NUM_FIELDS, CARDINALITY, RANK)),
      "strengths": rng.normal(0.0, 1.0, (NUM_FIELDS, NUM_FIELDS)),
  }


def generate(num_examples: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids int32 [N, F, L] with -1 in empty slots, clicks int32 [N], planted p float64 [N]);
  the examples come from rng([seed, 1])."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  model = planted_model(seed)
  rng = np.random.default_rng([seed, 1])
  popularity = (np.arange(CARDINALITY) + 1.0) ** -ZIPF_EXPONENT
  cdf = np.cumsum(popularity / popularity.sum())
  sizes_NF1 = rng.integers(1, BAG_SIZE + 1, (num_examples, NUM_FIELDS, 1))
  present_NFL = np.arange(BAG_SIZE) < sizes_NF1
  ranks_NFL = np.minimum(np.searchsorted(cdf, rng.random(present_NFL.shape)), CARDINALITY - 1)
  field_1F1 = np.arange(NUM_FIELDS)[None, :, None]
  drawn_NFL = model["rank_to_id"][field_1F1, ranks_NFL]
  share_NFL = present_NFL / sizes_NF1
  logit_N = BIAS + np.sum(share_NFL * model["weights"][field_1F1, drawn_NFL], axis=(1, 2))
  pooled_NFR = np.stack([np.einsum("nl,nlr->nr", share_NFL[:, f],
                                   model["latents"][f][drawn_NFL[:, f]])
                         for f in range(NUM_FIELDS)], axis=1)
  crosses_FF = np.triu(model["strengths"], k=1)
  gram_NFF = pooled_NFR @ pooled_NFR.transpose(0, 2, 1)
  logit_N += (CROSS_SCALE / RANK**0.5) * np.sum(gram_NFF * crosses_FF, axis=(1, 2))
  p_N = 1.0 / (1.0 + np.exp(-logit_N))
  clicks_N = (rng.random(num_examples) < p_N).astype(np.int32)
  return np.where(present_NFL, drawn_NFL, -1).astype(np.int32), clicks_N, p_N


@functools.lru_cache(maxsize=1)
def _all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return generate(NUM_TRAIN + NUM_TEST)


def _split_slice(split: str) -> slice:
  if split not in SPLITS:
    raise ValueError(f"{NAME} split={split!r} does not exist; allowed: {', '.join(SPLITS)}")
  return slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, NUM_TRAIN + NUM_TEST)


def load_clicks(split: str) -> digits.ArrayDataset:
  """The "train" or "test" split: inputs int32 [N, F, L] raw ids (-1 empty), labels int32 [N]."""
  part = _split_slice(split)
  ids, clicks, _ = _all()
  return digits.ArrayDataset(ids[part], clicks[part], name=NAME, split=split)


def oracle_auc(split: str) -> float:
  """The AUC of the planted click probabilities on `split` (ties count one half)."""
  part = _split_slice(split)
  _, clicks, p = _all()
  return exact_auc(p[part], clicks[part])


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """P(score of a random positive > score of a random negative) + P(tie) / 2, by mid-ranks."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  num_pos, num_neg = int(labels.sum()), int((~labels).sum())
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"AUC needs both classes, got {num_pos} positives and {num_neg} negatives")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
  ranks = mid_ranks[inverse]
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))
