"""The `aux` dict every sparsejax layer returns beside its output.

`aux = {"losses": {name: scalar}, "metrics": {name: array}}`. The trainer adds
`sum(aux["losses"].values())` to the task loss and logs `aux["metrics"]`. A model merges the aux
of its sublayers with `merge_aux`, prefixing each key with the sublayer's path, e.g.
`"layer_1/ffn/load_balance"`.

(The module is not called `aux.py`: AUX is a reserved file name on Windows.)
"""
from typing import Any

import jax
import jax.numpy as jnp

Aux = dict[str, dict[str, Any]]
AUX_KINDS = ("losses", "metrics")


def empty_aux() -> Aux:
  """An aux dict with no losses and no metrics: `{"losses": {}, "metrics": {}}`."""
  return {kind: {} for kind in AUX_KINDS}


def merge_aux(prefix: str, aux: Aux, into: Aux) -> Aux:
  """A new aux dict holding `into` plus each entry of `aux` under the key `f"{prefix}/{name}"`.

  Neither input is modified. Raises ValueError when `aux` does not have exactly the keys
  "losses" and "metrics", or when a prefixed key is already in `into`.
  """
  if set(aux) != set(AUX_KINDS):
    raise ValueError(
        f"aux from {prefix!r} must have exactly the keys 'losses' and 'metrics', "
        f"got {sorted(aux)}"
    )
  merged = {kind: dict(into[kind]) for kind in AUX_KINDS}
  for kind in AUX_KINDS:
    for name, value in aux[kind].items():
      key = f"{prefix}/{name}"
      if key in merged[kind]:
        raise ValueError(f"aux {kind} key {key!r} is already present")
      merged[kind][key] = value
  return merged


def total_aux_loss(aux: Any) -> Any:
  """The sum of every loss in an aux dict, however nested: each leaf under any "losses" key.

  Works on a layer's `(output, aux)` aux, a model's merged aux, or any dict of them (e.g.
  `{"moe": moe_aux, "memory": pkm_aux}`); a float32 zero when there are no losses.
  `loss = task_loss + sparsejax.total_aux_loss(aux)` is what the trainer optimises.
  """
  total = jnp.zeros((), jnp.float32)
  if not isinstance(aux, dict):
    return total
  for key, value in aux.items():
    if key == "losses":
      total = total + sum((jnp.sum(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(value)),
                          jnp.zeros((), jnp.float32))
    else:
      total = total + total_aux_loss(value)
  return total
