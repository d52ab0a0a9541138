"""DASS-style learned mask patterns: relaxed mask logits trained bilevel, then discretised.

Every sparsified leaf W gets mask logits S of its shape; the network runs with the relaxed
weights

  m̃ = σ(S / τ),   W' = W ⊙ m̃,   g' = ∂L/∂W' at W'

so one gradient of the loss at W' (any `grad_fn(params, batch)`, as `sparsejax.masks.init`
uses) gives both chain-rule gradients:

  ∂L/∂W = g' ⊙ m̃          ∂L/∂S = g' ⊙ W ⊙ m̃ (1 − m̃) / τ.

The search alternates first-order bilevel steps (DARTS' first-order approximation): the mask
logits descend L_val + R on a validation batch, where R = λ (ρ − d)² pulls the mean relaxed
density ρ = Σ m̃ / Σ n_l over the sparse leaves towards the target d; then the weights descend
L_train on a training batch. `discretise` keeps the highest logits at exactly the target density
(one global top-k, or per-leaf counts from `layer_densities`), giving a `Mask` for sparse
training with any updater.

  result = dass_search(grad_fn, params, train_batches, val_batches, density=0.1)
  tx = wrap(optax.adamw(1e-3), Updater(), None, result.mask)

Mousavi, Loni, Alibeigi & Daneshtalab (2023), "DASS: Differentiable Architecture Search for
Sparse Neural Networks" (bilevel search of sparse parametric operations, weights on the training
split and architecture parameters on the validation split, with a sparsity-aware objective).
"""
from typing import Any, Callable, Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.masks.distributions import layer_densities, leaf_structures
from sparsejax.masks.mask import DENSE, Mask, leaf_paths
from sparsejax.masks.structures import structure_name

PyTree = Any
GradFn = Callable[[PyTree, Any], PyTree]
DISTRIBUTIONS = ("global", "uniform", "erk")


def relaxed_mask(scores: jax.Array, temperature: float) -> jax.Array:
  """m̃ = σ(S / τ), the continuous mask in (0, 1)."""
  return jax.nn.sigmoid(scores / temperature)


def chain_grads(w: jax.Array, scores: jax.Array, g_relaxed: jax.Array,
                temperature: float) -> tuple[jax.Array, jax.Array]:
  """(∂L/∂W, ∂L/∂S) = (g' ⊙ m̃, g' ⊙ W ⊙ m̃ (1 − m̃) / τ) from g' = ∂L/∂W' at W' = W ⊙ m̃."""
  m = relaxed_mask(scores, temperature)
  return g_relaxed * m, g_relaxed * w * m * (1.0 - m) / temperature


def density_penalty_grads(scores: Sequence[jax.Array], density: float, lam: float,
                          temperature: float) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
  """(R, ρ, [∂R/∂S_l]) for R = λ (ρ − d)², ρ = Σ_l Σ σ(S_l / τ) / Σ_l n_l."""
  size = sum(s.size for s in scores)
  ms = [relaxed_mask(s, temperature) for s in scores]
  rho = sum(jnp.sum(m) for m in ms) / size
  coef = 2.0 * lam * (rho - density) / size / temperature
  return lam * (rho - density) ** 2, rho, [coef * m * (1.0 - m) for m in ms]


@flax.struct.dataclass
class DassState:
  """Weights, mask logits (a tree like params; dense leaves' logits are unused), optimizer states."""

  params: PyTree
  scores: PyTree
  weight_opt: optax.OptState
  score_opt: optax.OptState
  step: jax.Array


@flax.struct.dataclass
class DassResult:
  """The discretised `mask`, the searched weights `params` and the final mask logits `scores`."""

  mask: Mask
  params: PyTree
  scores: PyTree


def sparse_flags(params: PyTree, rules: Sequence[tuple[str, Any]] = ()) -> list[bool]:
  """Per leaf (leaf order): whether its structure is sparse; only "unstructured" is supported."""
  flags = []
  for path, (name, _) in leaf_structures(params, rules).items():
    if name not in (DENSE, "unstructured"):
      raise ValueError(f"DASS learns unstructured masks; leaf {path!r} has structure {name!r}")
    flags.append(name != DENSE)
  if not any(flags):
    raise ValueError(f"DASS found no leaf to sparsify among {leaf_paths(params)}")
  return flags


def relaxed_params(params: PyTree, scores: PyTree, sparse: Sequence[bool],
                   temperature: float) -> PyTree:
  """W ⊙ σ(S / τ) on sparse leaves, W unchanged on dense ones."""
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      w * relaxed_mask(s, temperature) if flag else w
      for w, s, flag in zip(leaves, jax.tree.leaves(scores), sparse, strict=True)])


def _split_grads(grad_fn: GradFn, state: DassState, batch: Any, sparse: Sequence[bool],
                 temperature: float) -> tuple[list[jax.Array], list[jax.Array]]:
  """([∂L/∂W per leaf], [∂L/∂S per sparse leaf]) on `batch`, from one gradient at W ⊙ m̃."""
  ws, ss = jax.tree.leaves(state.params), jax.tree.leaves(state.scores)
  g_relaxed = jax.tree.leaves(grad_fn(relaxed_params(state.params, state.scores, sparse,
                                                     temperature), batch))
  w_grads, s_grads = [], []
  for w, s, g, flag in zip(ws, ss, g_relaxed, sparse, strict=True):
    if flag:
      gw, gs = chain_grads(w, s, g, temperature)
      w_grads.append(gw)
      s_grads.append(gs)
    else:
      w_grads.append(g)
  return w_grads, s_grads


def dass_step(grad_fn: GradFn, state: DassState, train_batch: Any, val_batch: Any,
              sparse: Sequence[bool], weight_tx: optax.GradientTransformation,
              score_tx: optax.GradientTransformation, density: float, lam: float,
              temperature: float) -> tuple[DassState, dict[str, jax.Array]]:
  """One first-order bilevel step: S on ∇_S (L_val + R), then W on ∇_W L_train (at the new S).

  Returns the new state and {"penalty": R, "relaxed_density": ρ} before the step.
  """
  treedef = jax.tree.structure(state.params)
  _, s_val = _split_grads(grad_fn, state, val_batch, sparse, temperature)
  sparse_scores = [s for s, flag in zip(jax.tree.leaves(state.scores), sparse) if flag]
  penalty, rho, s_pen = density_penalty_grads(sparse_scores, density, lam, temperature)
  s_iter = iter([a + b for a, b in zip(s_val, s_pen)])
  score_grads = jax.tree.unflatten(treedef, [next(s_iter) if flag else jnp.zeros_like(s)
                                             for s, flag in zip(jax.tree.leaves(state.scores),
                                                                sparse)])
  updates, score_opt = score_tx.update(score_grads, state.score_opt, state.scores)
  state = state.replace(scores=optax.apply_updates(state.scores, updates), score_opt=score_opt)
  w_train, _ = _split_grads(grad_fn, state, train_batch, sparse, temperature)
  updates, weight_opt = weight_tx.update(jax.tree.unflatten(treedef, w_train), state.weight_opt,
                                         state.params)
  state = state.replace(params=optax.apply_updates(state.params, updates), weight_opt=weight_opt,
                        step=state.step + 1)
  return state, {"penalty": penalty, "relaxed_density": rho}


def _top(scores: np.ndarray, count: int) -> np.ndarray:
  """Bool array: the `count` highest entries of `scores` (stable: ties keep the lower index)."""
  keep = np.zeros(scores.size, bool)
  keep[np.argsort(-scores.reshape(-1), kind="stable")[:count]] = True
  return keep.reshape(scores.shape)


def discretise(scores: PyTree, density: float, distribution: str = "global",
               rules: Sequence[tuple[str, Any]] = ()) -> Mask:
  """The `Mask` keeping the highest mask logits at exactly round(d · Σ n_l) entries.

  "global": one top-k over all sparse leaves (the search decides the per-layer densities);
  "uniform" / "erk": per-leaf counts from `layer_densities`, top-k within each leaf. Ties keep
  the lower flat index.
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution={distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density}")
  sparse = sparse_flags(scores, rules)
  leaves, treedef = jax.tree.flatten(scores)
  paths = leaf_paths(scores)
  sparse_leaves = [np.asarray(s, np.float32) for s, flag in zip(leaves, sparse) if flag]
  if distribution == "global":
    flat = np.concatenate([s.reshape(-1) for s in sparse_leaves])
    kept_flat = _top(flat, int(round(density * flat.size)))
    ends = np.cumsum([s.size for s in sparse_leaves])
    kept = [kept_flat[end - s.size:end].reshape(s.shape) for end, s in zip(ends, sparse_leaves)]
  else:
    densities = layer_densities(scores, density, distribution, rules=rules)
    sparse_paths = [p for p, flag in zip(paths, sparse) if flag]
    kept = [_top(s, int(round(densities[p] * s.size)))
            for p, s in zip(sparse_paths, sparse_leaves)]
  kept_iter = iter(kept)
  mask_leaves = [next(kept_iter) if flag else np.ones(np.shape(s), bool)
                 for s, flag in zip(leaves, sparse)]
  names = {p: structure_name("unstructured") for p, flag in zip(paths, sparse) if flag}
  return Mask.from_leaves(jax.tree.unflatten(treedef, mask_leaves), names)


def dass_search(grad_fn: GradFn, params: PyTree, train_batches: Iterable[Any],
                val_batches: Iterable[Any], density: float, *, distribution: str = "global",
                rules: Sequence[tuple[str, Any]] = (),
                weight_tx: optax.GradientTransformation | None = None,
                score_tx: optax.GradientTransformation | None = None, lam: float = 1.0,
                temperature: float = 1.0, init_score: float = 0.0) -> DassResult:
  """Bilevel DASS search over zip(train_batches, val_batches), then `discretise` at `density`.

  `grad_fn(params, batch)` is ∂L/∂params at the given weights (called at W ⊙ m̃). Mask logits
  start at `init_score` (m̃ = σ(init_score / τ) everywhere); defaults: Adam(1e-3) on the
  weights, Adam(3e-2) on the logits.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if lam < 0:
    raise ValueError(f"lam must be >= 0, got {lam}")
  sparse = sparse_flags(params, rules)
  weight_tx = weight_tx or optax.adam(1e-3)
  score_tx = score_tx or optax.adam(3e-2)
  scores = jax.tree.map(lambda w: jnp.full(jnp.shape(w), init_score, jnp.float32), params)
  state = DassState(params=params, scores=scores, weight_opt=weight_tx.init(params),
                    score_opt=score_tx.init(scores), step=jnp.zeros((), jnp.int32))
  step = jax.jit(lambda st, tb, vb: dass_step(grad_fn, st, tb, vb, sparse, weight_tx, score_tx,
                                               density, lam, temperature)[0])
  for train_batch, val_batch in zip(train_batches, val_batches):
    state = step(state, train_batch, val_batch)
  mask = discretise(state.scores, density, distribution, rules)
  return DassResult(mask=mask.mirroring(params), params=state.params, scores=state.scores)
