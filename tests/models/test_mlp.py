"""MLP / LeNet-300-100 against a naive numpy forward pass; registry and clear errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import models
from sparsejax.registry import MODELS


def numpy_forward(params, x, num_hidden, activation):
  h = np.asarray(x, np.float64)
  for i in range(num_hidden):
    h = activation(h @ np.asarray(params[f"layer_{i}"]["kernel"], np.float64)
                   + np.asarray(params[f"layer_{i}"]["bias"], np.float64))
  return h @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"])


def init(model, x):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), x))


@pytest.mark.parametrize("activation, reference", [
    ("relu", lambda h: np.maximum(h, 0.0)),
    ("tanh", np.tanh),
])
def test_forward_matches_numpy(activation, reference):
  model = models.build_classifier({"name": "mlp", "hidden": [7, 5], "activation": activation},
                                  num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  variables = init(model, x)
  params = jax.tree.map(lambda p: p + 0.1, variables["params"])  # nonzero biases too
  logits, aux = model.apply({"params": params}, x)
  np.testing.assert_allclose(logits, numpy_forward(params, x, 2, reference), rtol=1e-5, atol=1e-5)
  assert aux == {"losses": {}, "metrics": {}}


def test_lenet_300_100_shapes_and_param_count():
  model = models.build_classifier({"name": "lenet_300_100"}, num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 64)))
  params = nn.meta.unbox(variables)["params"]
  shapes = {f"{k}/{n}": v.shape for k, layer in params.items() for n, v in layer.items()}
  assert shapes == {"layer_0/kernel": (64, 300), "layer_0/bias": (300,),
                    "layer_1/kernel": (300, 100), "layer_1/bias": (100,),
                    "head/kernel": (100, 10), "head/bias": (10,)}
  assert sum(v.size for v in jax.tree.leaves(params)) == 64 * 300 + 300 + 300 * 100 + 100 + 1010
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["layer_0"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert specs["head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")
  assert np.all(np.asarray(params["layer_0"]["bias"]) == 0)


def test_images_are_flattened_and_linear_classifier_has_no_hidden_layer():
  model = models.build_classifier({"name": "mlp", "hidden": ()}, num_classes=2)
  x = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3)
  params = init(model, x)["params"]
  assert set(params) == {"head"}
  logits, _ = model.apply({"params": params}, x)
  np.testing.assert_allclose(logits, numpy_forward(params, x.reshape(2, 9), 0, None), rtol=1e-5)


def test_registered_names():
  assert {"mlp", "lenet_300_100"} <= set(MODELS.names())


@pytest.mark.parametrize("config, message", [
    ({"name": "nope"}, "unknown model 'nope'; allowed: .*lenet_300_100"),
    ({"name": "mlp", "width": 3}, r"unknown arguments \['width'\] for model 'mlp'"),
    ({"name": "lenet_300_100", "hidden": [5]}, r"unknown arguments \['hidden'\]"),
    ({"hidden": [5]}, "needs a 'name' field"),
])
def test_bad_config_is_a_clear_error(config, message):
  with pytest.raises(ValueError, match=message):
    models.build_classifier(config, num_classes=10)


@pytest.mark.parametrize("kwargs, message", [
    ({"activation": "swish"}, "activation='swish'; allowed: gelu, relu, tanh"),
    ({"hidden": (4, 0)}, r"hidden=\(4, 0\) must be positive"),
    ({"num_classes": 0}, "num_classes=0"),
])
def test_bad_arguments_fail_at_trace_time(kwargs, message):
  model = models.MLP(**{"num_classes": 3, **kwargs})
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4)))
