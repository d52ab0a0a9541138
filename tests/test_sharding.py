"""Tests for the logical-axis rule table and mesh construction."""
import flax.linen as nn
import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import sharding
from sparsejax.sharding import LOGICAL_AXIS_RULES, logical_to_mesh_sharding, make_mesh, with_rules

LOGICAL_NAMES = (
    "batch", "length", "embed", "mlp", "heads", "kv", "expert", "slot", "memory", "latent", "vocab",
)


@pytest.mark.parametrize(
    "logical, expected",
    [
        (("vocab", "embed"), P("model", "fsdp")),
        (("embed", "vocab"), P("fsdp", "model")),
        (("batch", "length", "embed"), P(("data", "fsdp", "expert"), None, None)),
        (("batch", "length", "vocab"), P(("data", "fsdp", "expert"), None, "model")),
        (("embed", "heads", "kv"), P("fsdp", "model", None)),
        (("mlp", "embed"), P("model", "fsdp")),
        (("expert", "embed", "mlp"), P("expert", "fsdp", "model")),
        (("batch", "length", "expert"), P(("data", "fsdp"), None, "expert")),
        (("expert", "slot", "embed"), P("expert", None, "fsdp")),
        (("memory", "embed"), P("model", "fsdp")),
        (("embed", "latent"), P("fsdp", "model")),
        (("embed",), P("fsdp")),
    ],
)
def test_rules_resolve_hand_worked_cases(logical, expected):
  assert nn.logical_to_mesh_axes(logical, LOGICAL_AXIS_RULES) == expected


def test_rule_table_covers_exactly_the_design_names_and_mesh_axes():
  assert {name for name, _ in LOGICAL_AXIS_RULES} == set(LOGICAL_NAMES)
  used = {leaf for _, axes in LOGICAL_AXIS_RULES for leaf in jax.tree.leaves(axes)}
  assert used <= set(sharding.MESH_AXES)


def test_logical_to_mesh_sharding_maps_a_tree():
  mesh = make_mesh(data=2, fsdp=2, model=2)
  tree = {"embedding": P("vocab", "embed"), "blocks": [P("embed", "mlp"), P()]}
  shardings = logical_to_mesh_sharding(tree, mesh)
  assert shardings == {
      "embedding": NamedSharding(mesh, P("model", "fsdp")),
      "blocks": [NamedSharding(mesh, P("fsdp", "model")), NamedSharding(mesh, P())],
  }


def test_with_rules_activates_the_table_and_restores():
  with with_rules():
    assert nn.logical_to_mesh_axes(("batch", "embed")) == P(("data", "fsdp", "expert"), None)
  with with_rules((("embed", "model"),)):
    assert nn.logical_to_mesh_axes(("embed",)) == P("model")
  assert not nn.get_logical_axis_rules()


@pytest.mark.parametrize(
    "sizes, num_devices, expected",
    [
        ({}, 1, (1, 1, 1, 1)),
        ({"data": -1}, 8, (8, 1, 1, 1)),
        ({"data": 2, "fsdp": 2, "model": 2}, 8, (2, 2, 1, 2)),
        ({"data": 2, "fsdp": -1}, 8, (2, 4, 1, 1)),
        ({"expert": 4, "model": -1}, 8, (1, 1, 4, 2)),
        ({"model": -1}, 2, (1, 1, 1, 2)),
    ],
)
def test_make_mesh_shapes(sizes, num_devices, expected):
  mesh = make_mesh(**sizes, devices=jax.devices()[:num_devices])
  assert mesh.axis_names == sharding.MESH_AXES
  assert tuple(mesh.shape.values()) == expected
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_make_mesh_defaults_to_all_devices():
  assert make_mesh(data=-1).size == len(jax.devices()) == 8


def test_make_mesh_uses_the_given_devices():
  devices = jax.devices()[4:]
  mesh = make_mesh(fsdp=-1, devices=devices)
  assert tuple(mesh.shape.values()) == (1, 4, 1, 1)
  assert set(mesh.devices.flat) == set(devices)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "mesh data=3, fsdp=1, expert=1, model=1 needs 3 devices but there are 8"),
        ({"data": 4, "fsdp": 4}, "needs 16 devices but there are 8"),
        (
            {"data": -1, "model": -1},
            "at most one mesh axis may be -1 (the rest); got -1 for data, model",
        ),
        (
            {"data": 3, "fsdp": -1},
            "the other axes' product 3 does not divide the 8 devices, so fsdp=-1",
        ),
        ({"model": 0}, "mesh axis sizes must be ints >= 1, or -1 for the rest; got model=0"),
        ({"expert": -2}, "got expert=-2"),
        ({"fsdp": 2.0}, "got fsdp=2.0"),
    ],
)
def test_make_mesh_errors(sizes, message):
  with pytest.raises(ValueError) as error:
    make_mesh(**sizes)
  assert message in str(error.value)
  assert "\n" not in str(error.value)
