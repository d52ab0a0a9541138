"""FUSED: reversible unlearning with low-rank adapters on the layers most sensitive to the data.

1. Critical layer identification. Copies of the model θ are trained briefly on each client's
   (or data group's) data, giving θ^1..θ^K; a layer's sensitivity is its mean change

     d_l = (1 / K) Σ_k Σ_{leaves w of l} dist(w^k, w),
     dist(w^k, w) = ‖ (Σ_i |w^k_io − w_io|)_o ‖_2   for a kernel w_..IO (L1 over the input axis
                                                    per output, L2 over outputs and batch axes),
                  = Σ |w^k − w|                     for a vector (a bias),

   following the released code (`nn.PairwiseDistance(p=1)` over a torch weight's input axis,
   then a norm). `rank_layers` orders layers by d_l, largest first.
2. Sparse unlearning adapters: only the L most sensitive layers get one, a low-rank
   Δw_IO = a_IR b_RO on their kernel (b = 0 at init, so the adapted model starts as the base).
3. Knowledge overwriting: the adapters alone are trained on the data to keep (the base is
   frozen), overwriting what the critical layers hold about the data to forget.
4. Removal: the base params are never written (`attach` builds new arrays, and the unlearning
   step only differentiates the adapters), so dropping the adapters gives back the original
   model bit for bit; `attach` leaves every non-adapted leaf as the base's own array.

  tuned = [train_briefly(base, data_k) for data_k in client_data]
  layers = rank_layers(layer_sensitivity(base, tuned))[:2]
  adapters = init_adapters(key, base, layers, rank=4)
  step = make_unlearning_step(lambda p, batch: loss(p, batch), optax.adam(1e-3))
  adapters, opt_state, loss_value = step(base, adapters, opt_state, retain_batch)
  model.apply({"params": attach(base, adapters)}, x)      # unlearned
  model.apply({"params": base}, x)                        # adapters removed: the original

Zhong et al. 2025, "Unlearning through Knowledge Overwriting: Reversible Federated Unlearning
via Selective Sparse Adapter" (FUSED, CVPR 2025); Hu et al. 2022, "LoRA".
"""
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

KERNEL = "kernel"


def leaf_distance(tuned: jax.Array, base: jax.Array) -> jax.Array:
  """dist(w^k, w): L1 over the input axis per output, then L2 (kernels); L1 (vectors)."""
  diff = jnp.abs(jnp.asarray(tuned, jnp.float32) - jnp.asarray(base, jnp.float32))
  if diff.ndim <= 1:
    return jnp.sum(diff)
  return jnp.sqrt(jnp.sum(jnp.square(jnp.sum(diff, axis=-2))))


def _flat(params: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(nn.meta.unbox(flax.core.unfreeze(params)))


def layer_sensitivity(base: Mapping[str, Any], tuned: Sequence[Mapping[str, Any]]
                      ) -> dict[str, float]:
  """{layer path: d_l}: the mean over the tuned copies of the summed `leaf_distance` of the
  layer's leaves (a layer is a leaf's parent path, e.g. "layer_0" for "layer_0/kernel")."""
  if not tuned:
    raise ValueError("tuned must hold at least one trained copy of the params, got none")
  base_flat = _flat(base)
  sums: dict[str, float] = {}
  for copy in tuned:
    copy_flat = _flat(copy)
    if set(copy_flat) != set(base_flat):
      raise ValueError(f"a tuned copy has different params: "
                       f"{sorted('/'.join(p) for p in set(copy_flat) ^ set(base_flat))}")
    for path, w in base_flat.items():
      layer = "/".join(path[:-1])
      sums[layer] = sums.get(layer, 0.0) + float(leaf_distance(copy_flat[path], w))
  return {layer: total / len(tuned) for layer, total in sums.items()}


def rank_layers(sensitivity: Mapping[str, float]) -> list[str]:
  """Layer paths by sensitivity, largest first (ties: path order)."""
  return sorted(sensitivity, key=lambda layer: (-sensitivity[layer], layer))


def init_adapters(key: jax.Array, base: Mapping[str, Any], layers: Sequence[str], rank: int
                  ) -> dict[str, dict[str, jax.Array]]:
  """{layer: {"a": a_IR ~ N(0, 1/I), "b": b_RO = 0}} for the 2-D kernel of each layer."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be an int >= 1, got {rank!r}")
  flat = _flat(base)
  adapters = {}
  for layer, layer_key in zip(layers, jax.random.split(key, max(len(layers), 1))):
    path = tuple(layer.split("/")) + (KERNEL,)
    if path not in flat or jnp.ndim(flat[path]) != 2:
      raise ValueError(f"layer {layer!r} has no 2-D {KERNEL!r} to adapt")
    inputs, outputs = jnp.shape(flat[path])
    a_IR = jax.random.normal(layer_key, (inputs, rank), jnp.float32) / jnp.sqrt(inputs)
    adapters[layer] = {"a": a_IR, "b": jnp.zeros((rank, outputs), jnp.float32)}
  return adapters


def attach(base: Mapping[str, Any], adapters: Mapping[str, Mapping[str, jax.Array]]
           ) -> dict[str, Any]:
  """Unboxed params with kernel_IO + a_IR b_RO at each adapted layer; every other leaf is the
  base's own array (so an empty `adapters` gives the base back bit for bit)."""
  flat = _flat(base)
  merged = dict(flat)
  for layer, adapter in adapters.items():
    path = tuple(layer.split("/")) + (KERNEL,)
    if path not in flat:
      raise ValueError(f"adapter layer {layer!r} has no {KERNEL!r} in the params")
    w_IO = flat[path]
    merged[path] = (w_IO + jnp.dot(adapter["a"], adapter["b"])).astype(w_IO.dtype)
  return flax.traverse_util.unflatten_dict(merged)


def make_unlearning_step(loss_fn: Callable[[Any, Any], jax.Array],
                         tx: optax.GradientTransformation) -> Callable:
  """A jitted step (base, adapters, opt_state, batch) -> (adapters, opt_state, loss) that trains
  the adapters alone on `loss_fn(attach(base, adapters), batch)` (the data to keep); `base` is
  an input, never an output, so it cannot change. `opt_state` starts as `tx.init(adapters)`."""

  @jax.jit
  def step(base, adapters, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda a: loss_fn(attach(base, a), batch))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return step
