"""SAE training utilities: a unit-norm decoder constraint and input scaling (the geometric-median
init is `initializers.geometric_median`).

Independent of the SAE architecture: the decoder is any param named "W_dec" (or another
`param_name`) whose rows (last axis) are the dictionary atoms, e.g. W_dec: [N, D].
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.sae.initializers import unit_rows

def remove_parallel(u_ND: jax.Array, w_ND: jax.Array) -> jax.Array:
  """Each row of u without its component along the same row of w: u_n - <u_n, w^_n> w^_n.

  With w^_n = w_n / ||w_n||, the result is orthogonal to every w_n: the tangent of the unit
  sphere at w^_n, so a small step along it changes atom directions, not their norms.
  Bricken et al. 2023, "Towards Monosemanticity: Decomposing Language Models With Dictionary
  Learning".
  """
  w_hat_ND = unit_rows(w_ND)
  return u_ND - jnp.sum(u_ND * w_hat_ND, axis=-1, keepdims=True) * w_hat_ND


def unit_norm_decoder(param_name: str = "W_dec") -> optax.GradientTransformation:
  """An optax transform keeping the rows of every param named `param_name` at unit norm.

  For such a param W with incoming update u (rows n):
    u_perp = remove_parallel(u, W);   u' = unit_rows(W + u_perp) - W
  so optax.apply_updates gives W + u' with unit-norm rows; other params' updates pass through.
  It needs `params` in `update` and must come LAST in the chain, after the optimizer:
  `optax.chain(optax.adam(lr), unit_norm_decoder())`, so the optimizer's moments see the raw
  gradient and the constraint acts on the final step (a projection before Adam would be undone
  by its per-coordinate scaling, and weight decay's radial part is removed too). A param is
  matched by the last dict key on its path, so nested and Flax-boxed params work alike.
  Bricken et al. 2023, "Towards Monosemanticity"; Gao et al. 2024, "Scaling and evaluating
  sparse autoencoders" (unit-norm decoder rows after each step).
  """

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
    if params is None:
      raise ValueError("unit_norm_decoder needs params: call update(updates, state, params)")
    found = []

    def constrain(path, u, w):
      if _last_dict_key(path) != param_name:
        return u
      found.append(path)
      return (unit_rows(w + remove_parallel(u, w)) - w).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(constrain, updates, params)
    if not found:
      raise ValueError(f"unit_norm_decoder(param_name={param_name!r}): no param of that name; "
                       f"the params are named {_param_names(params)}")
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def activation_scale(x_TD: jax.Array) -> jax.Array:
  """The scalar s with mean_t ||s x_t|| = sqrt(D): s = sqrt(D) / mean_t ||x_t||.

  Scaling inputs by s makes SAE hyperparameters transfer across layers and models (inf when
  every row is zero). SAELens's normalize_activations="expected_average_only_in"; Anthropic
  2024, "Circuits Updates - April 2024".
  """
  x_TD = _rows("x_TD", x_TD).astype(jnp.float32)
  mean_norm = jnp.mean(jnp.linalg.norm(x_TD, axis=-1))
  return jnp.sqrt(jnp.float32(x_TD.shape[1])) / mean_norm


def _rows(name: str, x: Any) -> jax.Array:
  """`x` as a [T, D] array with T, D >= 1, else a ValueError naming it."""
  x = jnp.asarray(x)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f"{name} must be a non-empty [T, D] array, got shape {x.shape}")
  return x


def _last_dict_key(path: tuple[Any, ...]) -> Any:
  keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
  return keys[-1] if keys else None


def _param_names(params: Any) -> list[str]:
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return sorted({str(_last_dict_key(path)) for path in paths})
