"""Device mesh construction and the one table mapping logical axis names to mesh axes.

Layers name the dimensions of their params (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with logical names; `LOGICAL_AXIS_RULES` maps those names to the
mesh axes `MESH_AXES`. The same model code then runs on 1 CPU, 8 fake CPU devices, a GPU and a
TPU pod; only the mesh sizes change.

Typical use (the trainer):

  mesh = make_mesh(data=-1, fsdp=2)
  abstract = jax.eval_shape(model.init, rngs, tokens_BT)
  shardings = logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh)
  with jax.set_mesh(mesh), with_rules():
    variables = jax.jit(model.init, out_shardings=shardings)(rngs, tokens_BT)
    logits_BTV, aux = jax.jit(model.apply)(variables, tokens_BT)

Activation constraints only take effect while a mesh is set (`jax.set_mesh`) and the rules are
active (`with_rules`); otherwise they are no-ops and the model runs unsharded.
"""
import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "fsdp", "expert", "model")

# Flax rule semantics: rules are tried in order; a rule assigns its mesh axes to its logical
# dimension when that dimension is still unassigned and none of those mesh axes is used by another
# dimension of the same array. A logical name may therefore appear several times, and the first
# rule whose mesh axes are still free wins. A logical name with no usable rule is replicated.
#
#   expert           -> expert       (expert parallelism: experts and their slots / tokens)
#   batch            -> data x fsdp x expert, else data x fsdp: tokens are split over the
#                       expert axis too (each device of an expert group holds other tokens, as
#                       in GShard); an array that also has an `expert` dimension, which takes
#                       that axis first, keeps the batch on data x fsdp
#   vocab, heads,    -> model        (tensor parallelism: the wide dimension of each matmul;
#   mlp, memory,                      `latent` is the SAE / transcoder dictionary dimension)
#   latent
#   embed            -> fsdp, else replicated: params are FSDP-sharded along `embed`, while
#                       activations keep `embed` whole because `batch` already took `fsdp`
#   length, kv, slot -> replicated
#
# Worked cases: param ("vocab", "embed") -> P("model", "fsdp"); activation
# ("batch", "length", "embed") -> P(("data", "fsdp", "expert"), None, None); expert weights
# ("expert", "embed", "mlp") -> P("expert", "fsdp", "model"); ("batch", "length", "expert")
# -> P(("data", "fsdp"), None, "expert").
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("expert", "expert"),
    ("batch", ("data", "fsdp", "expert")),
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("memory", "model"),
    ("latent", "model"),
    ("embed", "fsdp"),
    ("embed", None),
    ("length", None),
    ("kv", None),
    ("slot", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    expert: int = 1,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "expert", "model") mesh over `devices` (default: all devices).

  Each size is a positive int; at most one may be -1, meaning "the devices left over", so that
  data * fsdp * expert * model == len(devices). Axes are `AxisType.Auto` (GSPMD propagation),
  which is what Linen's logical partitioning expects.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = {"data": data, "fsdp": fsdp, "expert": expert, "model": model}
  _check_sizes(sizes)
  sizes = _fill_rest(sizes, len(devices))
  return jax.make_mesh(
      tuple(sizes.values()),
      MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def _describe(sizes: dict[str, int]) -> str:
  return ", ".join(f"{axis}={size}" for axis, size in sizes.items())


def _check_sizes(sizes: dict[str, Any]) -> None:
  """Raises ValueError unless every size is an int >= 1 or -1, with at most one -1."""
  bad = {
      axis: size
      for axis, size in sizes.items()
      if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1
  }
  if bad:
    raise ValueError(
        f"mesh axis sizes must be ints >= 1, or -1 for the rest; got {_describe(bad)}"
    )
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(
        f"at most one mesh axis may be -1 (the rest); got -1 for {', '.join(rest)}"
    )


def _fill_rest(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """`sizes` with the -1 axis set to the devices left over; checks the product is num_devices."""
  known = math.prod(size for size in sizes.values() if size != -1)
  rest = [axis for axis, size in sizes.items() if size == -1]
  if rest:
    if num_devices % known:
      raise ValueError(
          f"mesh {_describe(sizes)}: the other axes' product {known} does not divide the "
          f"{num_devices} devices, so {rest[0]}=-1 has no integer size"
      )
    return {**sizes, rest[0]: num_devices // known}
  if known != num_devices:
    raise ValueError(
        f"mesh {_describe(sizes)} needs {known} devices but there are {num_devices}; "
        f"make the product {num_devices} or set one axis to -1"
    )
  return sizes


def logical_to_mesh_sharding(
    logical_spec_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: LogicalRules = LOGICAL_AXIS_RULES,
) -> Any:
  """Maps a tree of logical PartitionSpecs to a tree of NamedShardings on `mesh`.

  The tree is typically `nn.get_partition_spec(abstract_variables)`. Each PartitionSpec of
  logical names is resolved with `rules` (see LOGICAL_AXIS_RULES) into a PartitionSpec of mesh
  axes, then bound to `mesh`.
  """
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


@contextlib.contextmanager
def with_rules(rules: LogicalRules = LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Activates `rules` so `nn.with_logical_constraint` inside a model resolves logical names.

  Combine with `jax.set_mesh(mesh)` for the constraints to shard activations.
  """
  with nn.logical_axis_rules(rules):
    yield
