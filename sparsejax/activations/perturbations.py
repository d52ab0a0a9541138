"""Sparse universal perturbations: the top (p, q)-singular vector of a Jacobian over a batch, by a
(truncated) power iteration that only calls `jax.jvp` / `jax.vjp`.

For g: R^N -> R^M linearised at a point (e.g. v -> the batch of outputs f(x_b + v), whose
Jacobian J stacks the per-example Jacobians J_b), the (p, q)-singular vector maximises
||J v||_q subject to ||v||_p = 1. Boyd's generalised power method iterates
  v <- psi_p'(J^T psi_q(J v)),  then  v <- v / ||v||_p,
with psi_r(z) = sign(z) |z|^(r - 1) and 1/p + 1/p' = 1 (p = q = 2: the power method on J^T J,
converging to the top right singular vector). The truncated version keeps, after each step, the k
entries of largest |J^T psi_q(J v)| (a k-sparse perturbation) before normalising. J v is one
`jvp`, J^T u one call of the `vjp` function; J is never formed.
Khrulkov & Oseledets 2018, "Art of Singular Vectors and Universal Adversarial Perturbations";
Boyd 1974, "The power method for l^p norms"; Yuan & Zhang 2013, "Truncated Power Method for
Sparse Eigenvalue Problems".
"""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsejax import sites as sites_lib


def power_iteration(fn: Callable[[jax.Array], Any], primal: jax.Array, *, p: float = 2.0,
                    q: float = 2.0, k: int | None = None, num_iters: int = 50,
                    init: jax.Array | None = None,
                    key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(v, ||J v||_q): the (p, q)-singular vector of J = d fn / d primal at `primal` (fn maps an
  array of primal's shape to any pytree of arrays, whose leaves are concatenated), k-sparse when
  k is given, after `num_iters` steps from `init` (default: a normal draw from `key`, or key 0).

  p in (1, inf]; q in (1, inf); with p = inf, v has entries +-1 on its support.
  """
  if not p > 1:
    raise ValueError(f"p={p}; allowed: 1 < p <= inf")
  if not 1 < q < math.inf:
    raise ValueError(f"q={q}; allowed: 1 < q < inf")
  size = math.prod(primal.shape)
  if k is not None and not 1 <= k <= size:
    raise ValueError(f"k={k}; allowed: None (dense) or 1 <= k <= {size} (entries of v)")
  p_dual = 1.0 if p == math.inf else p / (p - 1.0)
  primal = primal.astype(jnp.float32)
  _, vjp_fn = jax.vjp(lambda v: _flat(fn(v)), primal)
  jvp = lambda v: jax.jvp(lambda x: _flat(fn(x)), (primal,), (v,))[1]

  def step(v, _):
    s = vjp_fn(_psi(jvp(v), q))[0]
    return _project(_psi(s, p_dual), jnp.abs(s), p, k), None

  if init is None:
    init = jax.random.normal(jax.random.key(0) if key is None else key, primal.shape)
  v0 = jnp.asarray(init, jnp.float32).reshape(primal.shape)
  v, _ = jax.lax.scan(step, _project(v0, jnp.abs(v0), p, k), None, length=num_iters)
  return v, _norm(jvp(v), q)


def input_perturbation(f: Callable[[jax.Array], Any], x_B_: jax.Array, **kwargs: Any
                       ) -> tuple[jax.Array, jax.Array]:
  """`power_iteration` of v -> [f(x_b + v) for each b] at v = 0: one perturbation v (of the
  shape of an example x_b) for the whole batch. `kwargs` go to `power_iteration`."""
  return power_iteration(lambda v: jax.vmap(lambda x: f(x + v))(x_B_),
                         jnp.zeros(x_B_.shape[1:], jnp.float32), **kwargs)


def site_perturbation(model: Any, variables: Any, inputs: Any, source_site: str,
                      target_site: str, *, apply_kwargs: dict[str, Any] | None = None,
                      **kwargs: Any) -> tuple[jax.Array, jax.Array]:
  """`power_iteration` of v -> the value at `target_site` when v (of the shape of the trailing
  axes of `source_site`'s [B, T, ...] value) is added to `source_site` at every example and
  position, at v = 0: a universal perturbation of one site, measured at a later one."""
  apply_kwargs = apply_kwargs or {}
  paths = sites_lib.site_paths(model, inputs, **apply_kwargs)
  source, target = (_one_site(model, inputs, name, site, apply_kwargs)
                    for name, site in (("source_site", source_site),
                                       ("target_site", target_site)))
  if paths.index(source) >= paths.index(target):
    raise ValueError(f"source_site={source!r} must come before target_site={target!r} in the "
                     f"model's call order: {', '.join(paths)}")
  shapes = jax.eval_shape(lambda x: sites_lib.collect(model, variables, x, sites=source,
                                                      **apply_kwargs)[1], inputs)

  def fn(v):
    recorded = {}

    def record(y):
      recorded["value"] = y
      return y

    sites_lib.splice(model, variables, inputs, fns={source: lambda x: x + v, target: record},
                     **apply_kwargs)
    return recorded["value"]

  return power_iteration(fn, jnp.zeros(shapes[source].shape[2:], jnp.float32), **kwargs)


def _one_site(model, inputs, name, pattern, apply_kwargs) -> str:
  matched = sites_lib.match_sites(model, inputs, sites=pattern, **apply_kwargs)
  if len(matched) != 1:
    raise ValueError(f"{name}={pattern!r} matches {matched}; give a pattern of one site")
  return matched[0]


def _flat(tree: Any) -> jax.Array:
  return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def _psi(z: jax.Array, r: float) -> jax.Array:
  """sign(z) |z|^(r - 1) (sign(z) for r = 1)."""
  return jnp.sign(z) if r == 1.0 else jnp.sign(z) * jnp.abs(z) ** (r - 1.0)


def _norm(z: jax.Array, r: float) -> jax.Array:
  return jnp.max(jnp.abs(z)) if r == math.inf else jnp.sum(jnp.abs(z) ** r) ** (1.0 / r)


def _project(v: jax.Array, magnitude: jax.Array, p: float, k: int | None) -> jax.Array:
  """v kept on the k entries of largest `magnitude` (all when k is None), scaled to ||v||_p = 1."""
  if k is not None:
    _, idx = jax.lax.top_k(magnitude.ravel(), k)
    v = jnp.zeros(v.size, v.dtype).at[idx].set(v.ravel()[idx]).reshape(v.shape)
  return v / _norm(v, p)
