"""SparseAutoencoder: the thin Flax Linen module over `sparsejax.sae.core.sae_apply`."""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux
from sparsejax.sae import core
from sparsejax.sae.config import SAEConfig
from sparsejax.sae.initializers import init_params
from sparsejax.sae.initializers import init_state
from sparsejax.sae.initializers import param_shapes

STATS = "sae_stats"  # the latent state (`initializers.init_state`) lives in this collection
PARAM_AXES = {
    "W_enc": ("embed", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed"),
    "b_dec": ("embed",),
    "log_threshold": ("latent",),
    "W_skip": ("embed", None),
}


class SparseAutoencoder(nn.Module):
  """A sparse autoencoder or transcoder: `core.sae_apply` with params and latent state.

  Params are `initializer(key)` drawn from the "params" stream, by default
  `initializers.init_params(key, config)` (tied encoder, unit-norm decoder rows, b_dec = 0); for
  a data-dependent start pass e.g. `functools.partial(init_params, config=config, data_TD=x)`
  (geometric-median b_dec) or `init_active_subspace` likewise. They are annotated with
  the logical axes of `PARAM_AXES` ("latent" is the dictionary axis). The latent state lives in
  the "sae_stats" collection and is updated when that collection is mutable and not
  `deterministic`; training (not `deterministic`) runs BatchTopK over the batch and draws the
  OrtSAE chunk partition from the "dropout" stream.

  Call: `(x_TD, *, target_TD=None, deterministic=True) -> (x_hat_TD, aux)`; a transcoder
  passes its target as `target_TD`.
  """

  config: SAEConfig
  initializer: Callable[[jax.Array], dict[str, jax.Array]] | None = None

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, target_TD: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    params = self._params()
    stats = {name: self.variable(STATS, name, lambda value=value: value)
             for name, value in init_state(self.config).items()}
    rng = None
    if (not deterministic and self.config.orthogonality_coeff > 0
        and self.config.orthogonality_chunks > 1):
      rng = self.make_rng("dropout")
    x_hat_TD, _, aux, new_state = core.sae_apply(
        params, x_TD, self.config, target_TD=target_TD,
        state={name: variable.value for name, variable in stats.items()},
        training=not deterministic, rng=rng)
    if not deterministic and self.is_mutable_collection(STATS):
      for name, variable in stats.items():
        variable.value = new_state[name]
    return x_hat_TD, aux

  def _params(self) -> dict[str, jax.Array]:
    """The params of `init_params`, drawn together (the encoder is tied to the decoder)."""
    shapes = param_shapes(self.config)
    initializer = self.initializer or functools.partial(init_params, config=self.config)
    initial = initializer(self.make_rng("params")) if self.is_initializing() else {}

    def init_fn(_, name):
      # Outside init only the shape matters: Flax checks it with jax.eval_shape.
      return initial[name] if initial else jnp.zeros(shapes[name], jnp.float32)

    return {name: self.param(name, nn.with_logical_partitioning(init_fn, PARAM_AXES[name]), name)
            for name in shapes}
