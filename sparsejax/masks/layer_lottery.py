"""Removing whole residual blocks chosen at initialisation ("layers play the lottery").

  grads = jax.grad(loss)(params, batch)                     # at init, on a few batches
  drop = blocks_to_drop(params, grads, num_drop=2)          # e.g. (1, 4): the lowest scores
  shallow = drop_blocks(params, drop)                        # params of a num_layers - 2 LM
  ffn_layers = kept_layer_indices(config.ffn_layers, drop, num_layers)   # when set

A pre-norm block computes x + f_l(x); without block l the residual stream passes through, which
is exactly the LM with `num_layers - 1` blocks whose `layer_i` (i > l) are renumbered i − 1, so
removal is a param-tree transformation (no model change, and the compute really drops).
"""
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sparsejax.masks.mask import leaves_by_path

PyTree = Any

BLOCK = re.compile(r"(^|/)layer_(\d+)(/|$)")
SCORES = ("snip", "grad_norm")


def _block_of(path: str) -> int | None:
  found = BLOCK.search(path)
  return None if found is None else int(found.group(2))


def block_scores(params: PyTree, grads: PyTree, score: str = "snip") -> dict[int, jax.Array]:
  """{l: score of block `layer_l`} from the gradient at initialisation.

  "snip": S_l = Σ_{θ∈block l} |θ ⊙ ∂L/∂θ| (connection sensitivity, Lee et al. (2019), "SNIP"),
  "grad_norm": S_l = ‖∂L/∂θ_l‖₂ (gradient norm, as in GraSP/GradNorm pruning-at-init baselines).
  Blocks whose removal changes the loss least score lowest.
  """
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")
  ws, gs = leaves_by_path(params), leaves_by_path(grads)
  if set(ws) != set(gs):
    raise ValueError(f"params and grads have different leaves: {sorted(set(ws) ^ set(gs))}")
  totals: dict[int, jax.Array] = {}
  for path, w in ws.items():
    block = _block_of(path)
    if block is None:
      continue
    g = gs[path].astype(jnp.float32)
    term = jnp.sum(jnp.abs(w * g)) if score == "snip" else jnp.sum(jnp.square(g))
    totals[block] = totals.get(block, 0.0) + term
  if not totals:
    raise ValueError("params hold no 'layer_<l>' blocks to score")
  if score == "grad_norm":
    totals = {block: jnp.sqrt(total) for block, total in totals.items()}
  return dict(sorted(totals.items()))


def blocks_to_drop(params: PyTree, grads: PyTree, num_drop: int,
                   score: str = "snip") -> tuple[int, ...]:
  """The `num_drop` blocks with the lowest `block_scores` (ties: lower l first), sorted.

  A host function (it reads the scores). Lottery-style layer selection at initialisation.
  """
  scores = {block: float(s) for block, s in block_scores(params, grads, score).items()}
  if not 0 <= num_drop < len(scores):
    raise ValueError(f"num_drop must be in [0, {len(scores)}) (blocks: {len(scores)}), "
                     f"got {num_drop}")
  return tuple(sorted(sorted(scores, key=lambda block: (scores[block], block))[:num_drop]))


def kept_layer_indices(layers: Sequence[int] | None, dropped: Sequence[int],
                       num_layers: int) -> tuple[int, ...] | None:
  """`layers` (e.g. `ffn_layers`) renumbered for the LM without the `dropped` blocks."""
  if layers is None:
    return None
  new_index = {old: new for new, old in enumerate(
      [block for block in range(num_layers) if block not in set(dropped)])}
  return tuple(new_index[layer] for layer in layers if layer in new_index)


def drop_blocks(params: PyTree, dropped: Sequence[int]) -> PyTree:
  """`params` without the subtrees `layer_l`, l in `dropped`; later blocks renumbered down.

  Works on any nested-dict tree whose blocks are keys "layer_<l>" (at any depth, e.g. under
  "params"); the result is the init of the LM with `num_layers - len(dropped)` blocks.
  """
  dropped = set(dropped)
  present = {_block_of(path) for path in leaves_by_path(params)} - {None}
  if not dropped <= present:
    raise ValueError(f"dropped blocks {sorted(dropped - present)} are not in the params "
                     f"(blocks: {sorted(present)})")

  def walk(node):
    if not isinstance(node, dict):
      return node
    blocks = sorted(int(k[6:]) for k in node if re.fullmatch(r"layer_\d+", k))
    new_index = {old: new for new, old in enumerate(b for b in blocks if b not in dropped)}
    out = {}
    for key, child in node.items():
      if re.fullmatch(r"layer_\d+", key):
        if int(key[6:]) in new_index:
          out[f"layer_{new_index[int(key[6:])]}"] = child
      else:
        out[key] = walk(child)
    return out

  return walk(params)
