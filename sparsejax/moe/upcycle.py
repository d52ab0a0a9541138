"""Sparse upcycling: an MoE LM's params from a dense LM's, each expert a copy of its block's FFN."""
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

Path = tuple[str, ...]

# Expert weight of an MoE FFN -> the `sparsejax.models.DenseFFN` weight every expert copies.
EXPERT_SOURCES = {"wi_EDF": "wi", "wg_EDF": "wi_gate", "wo_EFD": "wo"}
ROUTER = "router_DE"  # an MoE FFN's own router weight
SHARED_ROUTER = "shared_router"  # TransformerLM(shared_router=True)'s router weight
_LAYER = re.compile(r"layer_(\d+)")


def upcycle_params(dense_params: Mapping[str, Any], moe_params_template: Mapping[str, Any], *,
                   layers: Sequence[int] | None = None, router_scale: float | None = None,
                   rng: jax.Array | None = None) -> dict[str, Any]:
  """The MoE LM's params, each expert of an upcycled block a copy of that block's dense FFN.

  For an upcycled block l and every expert e: W_in[e] = W_in^l, W_gate[e] = W_gate^l (swiglu),
  W_out[e] = W_out^l. Router weights (a block's "router_DE", the model's "shared_router") keep
  the template's fresh init (the MoE layer's small truncated normal, std ~ sqrt(0.1 / D)), or
  are set to 0 or drawn ~ N(0, router_scale^2). Every other param is the dense one.
  With identical experts, routing whose gates sum to 1 per token (e.g. top-k with
  renormalize=True, or hash routing) makes the MoE LM compute the dense LM's function at the
  start. Komatsuzaki et al., 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
  Checkpoints".

  Args:
    dense_params: the dense TransformerLM's params (a nested dict; boxed or not).
    moe_params_template: the MoE TransformerLM's params, e.g. a fresh init. Only structure,
      shapes and dtypes are read (so `jax.eval_shape` of the init will do), except for the
      params kept as they are: routers when router_scale is None, and the FFN params of MoE
      blocks left out of `layers`.
      The dense and MoE models must agree everywhere but in the upcycled FFNs, and an upcycled
      FFN's activation must match: DenseFFN "gelu" <-> MoE expert "ffn", "swiglu" <-> "swiglu".
    layers: the blocks to upcycle; None for every block whose template FFN has experts.
    router_scale: None to keep the template's routers; else the standard deviation of a new
      router init, 0 for zeros.
    rng: PRNG key of the new router init; required when router_scale > 0.

  Returns:
    Unboxed params with the template's structure, shapes and dtypes.

  Raises:
    ValueError naming the param or block, when the two trees do not correspond as above.
  """
  dense = _flatten(dense_params)
  template = _flatten(moe_params_template)
  upcycled = _blocks_to_upcycle(template, layers)
  kept = set(_moe_blocks(template)) - set(upcycled)
  for block in upcycled:
    _check_activation(dense, template, block)
  routers = [path for path in template if _is_router(path) and _block(path) not in kept]
  kept_paths = [path for path in template if _block(path) in kept]
  kept_paths += routers if router_scale is None else []
  params = {path: _concrete(template[path], path) for path in kept_paths}
  if router_scale is not None:
    params.update(_init_routers(routers, template, router_scale, rng))
  used = set()
  for path, like in template.items():
    if path not in params:
      source = _dense_source(path, upcycled)
      params[path] = _fit(dense, source, path, like)
      used.add(source)
  unused = ["/".join(path) for path in dense if path not in used and _block(path) not in kept]
  if unused:
    raise ValueError(f"dense params {unused} have no counterpart in the MoE template; the two "
                     f"models must differ only in their FFNs")
  return flax.traverse_util.unflatten_dict(params)


def _flatten(params: Mapping[str, Any]) -> dict[Path, Any]:
  return flax.traverse_util.flatten_dict(nn.meta.unbox(params))


def _block(path: Path) -> int | None:
  """l when `path` is a param of block l's FFN ("layer_l/ffn/..."), else None."""
  match = _LAYER.fullmatch(path[0])
  return int(match[1]) if match and len(path) > 2 and path[1] == "ffn" else None


def _moe_blocks(template: dict[Path, Any]) -> list[int]:
  """The blocks whose FFN holds experts (a "wi_EDF" param), ascending."""
  return sorted({_block(path) for path in template if path[-1] == "wi_EDF"} - {None})


def _blocks_to_upcycle(template: dict[Path, Any], layers: Sequence[int] | None) -> list[int]:
  moe_blocks = _moe_blocks(template)
  if not moe_blocks:
    raise ValueError("the MoE template has no FFN with experts (no layer_*/ffn/wi_EDF param)")
  if layers is None:
    return moe_blocks
  outside = sorted(set(layers) - set(moe_blocks))
  if outside:
    raise ValueError(f"layers {outside} have no MoE FFN in the template; allowed: {moe_blocks}")
  return sorted(set(layers))


def _check_activation(dense: dict[Path, Any], template: dict[Path, Any], block: int) -> None:
  """ValueError unless block's dense FFN is swiglu exactly when its experts are."""
  dense_swiglu = (f"layer_{block}", "ffn", "wi_gate") in dense
  moe_swiglu = (f"layer_{block}", "ffn", "wg_EDF") in template
  if dense_swiglu != moe_swiglu:
    dense_kind, moe_kind, needed = (("swiglu", "ffn", "swiglu") if dense_swiglu
                                    else ("gelu", "swiglu", "ffn"))
    raise ValueError(f"layer_{block}: the dense FFN's activation is {dense_kind!r} but the MoE "
                     f"experts are {moe_kind!r}; upcycling needs model.ffn.expert={needed!r}")


def _is_router(path: Path) -> bool:
  return path == (SHARED_ROUTER,) or (_block(path) is not None and path[-1] == ROUTER)


def _concrete(value: Any, path: Path) -> Any:
  """`value`, a template param kept as it is, after checking it is not abstract."""
  if isinstance(value, jax.ShapeDtypeStruct):
    raise ValueError(f"the template's {'/'.join(path)} is kept as it is, so must be an array, "
                     f"not a jax.ShapeDtypeStruct (pass router_scale to draw routers afresh)")
  return value


def _init_routers(paths: list[Path], template: dict[Path, Any], scale: float,
                  rng: jax.Array | None) -> dict[Path, jax.Array]:
  """Zeros, or scale * N(0, 1), of each router's template shape and dtype."""
  if not scale >= 0:
    raise ValueError(f"router_scale must be >= 0, got {scale}")
  if scale == 0:
    return {path: jnp.zeros(template[path].shape, template[path].dtype) for path in paths}
  if rng is None:
    raise ValueError(f"router_scale={scale} > 0 draws the router init; pass rng")
  keys = jax.random.split(rng, len(paths))
  return {path: scale * jax.random.normal(key, template[path].shape, template[path].dtype)
          for path, key in zip(sorted(paths), keys)}


def _dense_source(path: Path, upcycled: list[int]) -> Path:
  """The dense param that MoE param `path` copies (broadcast over experts in an upcycled FFN)."""
  if _block(path) not in upcycled:
    return path
  if path[-1] not in EXPERT_SOURCES:
    raise ValueError(f"cannot upcycle {'/'.join(path)}: an upcycled FFN may hold only "
                     f"{', '.join((*EXPERT_SOURCES, ROUTER))} (e.g. no shared experts)")
  return (*path[:-1], EXPERT_SOURCES[path[-1]])


def _fit(dense: dict[Path, Any], source: Path, path: Path, like: Any) -> jax.Array:
  """dense[source], cast to like's dtype and broadcast over a leading expert axis if needed."""
  name, source_name = "/".join(path), "/".join(source)
  if source not in dense:
    raise ValueError(f"MoE param {name} needs the dense param {source_name}, which is missing")
  w = jnp.asarray(dense[source])
  expected = like.shape[1:] if source != path else like.shape
  if w.shape != expected:
    raise ValueError(f"MoE param {name} of shape {like.shape} cannot take dense {source_name} of "
                     f"shape {w.shape}; needs {expected} (same d_model, d_ff and vocab)")
  return jnp.broadcast_to(w.astype(like.dtype), like.shape)
