"""Sparse coding by unrolled proximal gradient: ISTA / IHT and learned ISTA (LISTA) as a scan.

The problem: min_z 0.5 ||y - D z||^2 + lam g(z) for a dictionary D_DN (N atoms in R^D, y = D z per
example, so y_BD = z_BN D^T) and a penalty g in PENALTIES:
  "l1"     g(z) = sum_n |z_n|                (ISTA, the Lasso)
  "l0"     g(z) = #{n : z_n != 0}            (IHT)
  "l_half" g(z) = sum_n |z_n|^(1/2)          (half thresholding)
Proximal gradient with step mu: z <- prox_{mu lam g}(z - mu D^T (D z - y)), mu = 1/L with
L = ||D||_2^2. LISTA unrolls I such steps, z_{i+1} = prox_{theta_i g}(W_i y + S_i z_i) from
z_0 = 0, with W_i, S_i, theta_i learned; ISTA is W = mu D^T, S = I - mu D^T D, theta = mu lam.
Shape letter beyond the DESIGN legend: I, the number of unrolled iterations.
Gregor & LeCun 2010, "Learning Fast Approximations of Sparse Coding"; Daubechies, Defrise & De Mol
2004 (ISTA); Blumensath & Davies 2009, "Iterative Hard Thresholding for Compressed Sensing"; Xu et
al. 2012, "L1/2 Regularization: A Thresholding Representation Theory and a Fast Solver".
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux

# Xu et al.'s cut for min (x - y)^2 + l |x|^(1/2): |y| > (54^(1/3) / 4) l^(2/3).
_HALF_CUT = 54 ** (1 / 3) / 4


def soft_threshold(x: jax.Array, lam: jax.Array | float) -> jax.Array:
  """prox of lam |.|: argmin_z 0.5 (z - x)^2 + lam |z| = sign(x) max(|x| - lam, 0), elementwise."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - lam, 0.0)


def hard_threshold(x: jax.Array, lam: jax.Array | float) -> jax.Array:
  """prox of lam [z != 0] (l0): argmin_z 0.5 (z - x)^2 + lam [z != 0] = x [|x| > sqrt(2 lam)].

  Its gradient in x is the kept mask; in lam it is zero almost everywhere.
  Blumensath & Davies 2009, "Iterative Hard Thresholding for Compressed Sensing".
  """
  return jnp.where(jnp.abs(x) > jnp.sqrt(2.0 * lam), x, 0.0)


def half_threshold(x: jax.Array, lam: jax.Array | float) -> jax.Array:
  """prox of lam |.|^(1/2): argmin_z 0.5 (z - x)^2 + lam |z|^(1/2), elementwise, in closed form.

  With l = 2 lam (Xu et al. write the quadratic without the 0.5):
    z = (2/3) x (1 + cos(2 pi / 3 - (2/3) phi(x))),  phi(x) = arccos((l / 8) (|x| / 3)^(-3/2))
  for |x| > (54^(1/3) / 4) l^(2/3), else 0 (the global minimiser; it jumps at the cut).
  Xu et al. 2012, "L1/2 Regularization: A Thresholding Representation Theory and a Fast Solver".
  """
  scaled = 2.0 * jnp.asarray(lam, jnp.result_type(x, float))
  keep = jnp.abs(x) > _HALF_CUT * scaled ** (2 / 3)
  abs_kept = jnp.where(keep, jnp.abs(x), 1.0)  # finite gradients off the kept set
  cos_arg = jnp.where(keep, (scaled / 8) * (abs_kept / 3) ** -1.5, 0.0)
  phi = jnp.arccos(cos_arg)
  return jnp.where(keep, (2 / 3) * x * (1 + jnp.cos(2 * np.pi / 3 - (2 / 3) * phi)), 0.0)


PROXES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "l1": soft_threshold, "l0": hard_threshold, "l_half": half_threshold}
PENALTIES = tuple(PROXES)


def _check_penalty(penalty: str) -> None:
  if penalty not in PROXES:
    raise ValueError(f"penalty={penalty!r}; allowed: {', '.join(PENALTIES)}")


def _check_num_iters(num_iters: int) -> None:
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters={num_iters!r}; allowed: a positive int")


def lipschitz_step(dictionary_DN: jax.Array) -> jax.Array:
  """mu = 1 / L with L = ||D||_2^2, the largest eigenvalue of D^T D (ISTA's safe step)."""
  return 1.0 / jnp.linalg.norm(dictionary_DN, ord=2) ** 2


def ista(y_BD: jax.Array, dictionary_DN: jax.Array, lam: float | jax.Array,
         step: float | jax.Array, num_iters: int, penalty: str = "l1") -> jax.Array:
  """z_BN after `num_iters` proximal gradient steps from z = 0 (ISTA for "l1", IHT for "l0").

  z <- prox_{step lam g}(z - step D^T (D z - y)); converges for step <= 1 / ||D||_2^2
  (`lipschitz_step`). Daubechies, Defrise & De Mol 2004, "An iterative thresholding algorithm for
  linear inverse problems with a sparsity constraint"; Blumensath & Davies 2009 (IHT).
  """
  _check_penalty(penalty)
  _check_num_iters(num_iters)
  if dictionary_DN.ndim != 2 or y_BD.shape[-1] != dictionary_DN.shape[0]:
    raise ValueError(f"y_BD {y_BD.shape} and dictionary_DN {dictionary_DN.shape} must be "
                     "[..., D] and [D, N]")
  return _ista(y_BD, dictionary_DN, lam, step, num_iters, penalty)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _ista(y_BD, dictionary_DN, lam, step, num_iters, penalty):
  prox = PROXES[penalty]

  def body(_, z_BN):
    grad_BN = (z_BN @ dictionary_DN.T - y_BD) @ dictionary_DN
    return prox(z_BN - step * grad_BN, step * lam)

  z_BN = jnp.zeros(y_BD.shape[:-1] + dictionary_DN.shape[1:], jnp.result_type(y_BD, float))
  return jax.lax.fori_loop(0, num_iters, body, z_BN)


def lista_params(dictionary_DN: jax.Array, lam: float | jax.Array, num_iters: int,
                 tied: bool = False) -> dict[str, jax.Array]:
  """LISTA params that reproduce ISTA with step 1/L on `dictionary_DN`.

  w_e = D^T / L ([D, N], or [I, D, N] untied), s = I - D^T D / L ([N, N] or [I, N, N]) and
  theta = lam / L ([I]), with L = ||D||_2^2. Gregor & LeCun 2010 (their initialisation).
  """
  _check_num_iters(num_iters)
  return _lista_params(dictionary_DN, lam, num_iters, bool(tied))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lista_params(dictionary_DN, lam, num_iters, tied):
  step = lipschitz_step(dictionary_DN)
  num_atoms = dictionary_DN.shape[1]
  w_e_DN = step * dictionary_DN
  s_NN = jnp.eye(num_atoms, dtype=dictionary_DN.dtype) - step * dictionary_DN.T @ dictionary_DN
  if not tied:
    w_e_DN = jnp.broadcast_to(w_e_DN, (num_iters,) + w_e_DN.shape)
    s_NN = jnp.broadcast_to(s_NN, (num_iters,) + s_NN.shape)
  theta_I = jnp.full((num_iters,), step * lam, dictionary_DN.dtype)
  return {"w_e": w_e_DN, "s": s_NN, "theta": theta_I}


def lista_apply(params: dict[str, jax.Array], y_BD: jax.Array, penalty: str = "l1") -> jax.Array:
  """z_BN of LISTA: z_{i+1} = prox_{theta_i g}(y W_i + z_i S_i) for i < I, from z_0 = 0.

  `params` as `lista_params` makes them: "w_e" [D, N] or [I, D, N], "s" [N, N] or [I, N, N]
  (tied or one per iteration), "theta" [I]; the iterations run as one `lax.scan`.
  Gregor & LeCun 2010, "Learning Fast Approximations of Sparse Coding".
  """
  _check_penalty(penalty)
  return _lista_apply(params, y_BD, penalty)


@functools.partial(jax.jit, static_argnums=(2,))
def _lista_apply(params, y_BD, penalty):
  prox = PROXES[penalty]
  tied = params["w_e"].ndim == 2
  per_iter = {"theta": params["theta"]} if tied else params

  def body(z_BN, layer):
    w_e_DN = params["w_e"] if tied else layer["w_e"]
    s_NN = params["s"] if tied else layer["s"]
    return prox(y_BD @ w_e_DN + z_BN @ s_NN, layer["theta"]), None

  z_BN = jnp.zeros(y_BD.shape[:-1] + params["s"].shape[-1:], jnp.result_type(y_BD, float))
  z_BN, _ = jax.lax.scan(body, z_BN, per_iter)
  return z_BN


def code_metrics(z_BN: jax.Array) -> dict[str, jax.Array]:
  """{"l0": mean nonzeros per code, "sparsity": the fraction of exact zeros}."""
  nonzero_BN = (z_BN != 0).astype(jnp.float32)
  return {"l0": jnp.mean(jnp.sum(nonzero_BN, axis=-1)), "sparsity": 1.0 - jnp.mean(nonzero_BN)}


def random_dictionary(key: jax.Array, signal_dim: int, num_atoms: int) -> jax.Array:
  """dictionary_DN with i.i.d. normal entries and unit-norm columns (atoms)."""
  dictionary_DN = jax.random.normal(key, (signal_dim, num_atoms), jnp.float32)
  return dictionary_DN / jnp.linalg.norm(dictionary_DN, axis=0, keepdims=True)


LISTA_AXES = {"w_e": ("embed", "latent"), "s": ("latent", None), "theta": (None,)}


class LISTA(nn.Module):
  """Learned ISTA: `lista_apply` with learned w_e, s and thresholds theta, `num_iters` unrolled.

  z_{i+1} = prox_{theta_i g}(y W_i + z_i S_i), z_0 = 0, g the `penalty` ("l1", "l0", "l_half");
  W and S are tied across iterations when `tied`, theta is per iteration (with "l0", theta gets
  no gradient: the hard threshold is flat in it almost everywhere). Params start as ISTA
  with step 1/L and penalty weight `lam` on a random unit-norm dictionary (`lista_params` of
  `random_dictionary` drawn from the "params" stream); to start from a known dictionary, pass
  `{"params": lista_params(dictionary_DN, lam, num_iters, tied)}` to `apply`. Param axes:
  w_e ("embed", "latent"), s ("latent", None), plus a leading None axis when untied.
  Call: `(y_BD, *, deterministic=True) -> (z_BN, aux)`, aux metrics "l0" and "sparsity".
  Gregor & LeCun 2010, "Learning Fast Approximations of Sparse Coding".
  """

  num_features: int
  num_iters: int
  penalty: str = "l1"
  lam: float = 0.1
  tied: bool = False

  @nn.compact
  def __call__(self, y_BD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No randomness.
    _check_penalty(self.penalty)
    _check_num_iters(self.num_iters)
    signal_dim = y_BD.shape[-1]
    initial = {}
    if self.is_initializing():
      dictionary_DN = random_dictionary(self.make_rng("params"), signal_dim, self.num_features)
      initial = lista_params(dictionary_DN, self.lam, self.num_iters, self.tied)

    def param(name, shape):
      axes = ((None,) if name != "theta" and not self.tied else ()) + LISTA_AXES[name]
      init_fn = lambda _: initial[name] if initial else jnp.zeros(shape, jnp.float32)
      return self.param(name, nn.with_logical_partitioning(init_fn, axes))

    lead = () if self.tied else (self.num_iters,)
    params = {"w_e": param("w_e", lead + (signal_dim, self.num_features)),
              "s": param("s", lead + (self.num_features, self.num_features)),
              "theta": param("theta", (self.num_iters,))}
    z_BN = lista_apply(params, y_BD, self.penalty)
    return z_BN, {"losses": {}, "metrics": code_metrics(z_BN)}
