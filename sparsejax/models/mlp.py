"""Multi-layer perceptron classifiers (LeNet-300-100), registered in `MODELS` for configs.

A classifier maps flat features x_BD to class logits and returns `(logits_BC, aux)` like every
sparsejax layer. Its params are plain nested dicts, `{"layer_0": {"kernel", "bias"}, ...,
"head": {"kernel", "bias"}}`, kernels laid out `(in, out)` (the mask convention: last axis =
outputs), so path rules such as `r"layer_\\d+/kernel"` pick the hidden layers.

  model = build_classifier({"name": "lenet_300_100"}, num_classes=10)
  variables = model.init(rng, x_BD)
  logits_BC, aux = model.apply(variables, x_BD)
"""
import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux, empty_aux
from sparsejax.models.layers import logical_param
from sparsejax.registry import MODELS

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh}


class Linear(nn.Module):
  """y_BF = x_BD W_DF + b_F with a LeCun-normal (in, out) `kernel` and a zero `bias`.

  The kernel's logical axes are ("embed", out_axis), the bias's (out_axis,).
  """

  features: int
  out_axis: str = "mlp"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BD: jax.Array) -> jax.Array:
    w_DF = logical_param(self, "kernel", nn.initializers.lecun_normal(),
                         (x_BD.shape[-1], self.features), ("embed", self.out_axis), self.dtype)
    b_F = logical_param(self, "bias", nn.initializers.zeros, (self.features,), (self.out_axis,),
                        self.dtype)
    return x_BD @ w_DF + b_F


@MODELS.register("mlp")
class MLP(nn.Module):
  """A fully connected classifier: hidden layers with a nonlinearity, then a linear head.

  h_0 = x_BD;  h_{l+1} = act(h_l W_l + b_l) for l < L;  logits_BC = h_L W_head + b_head,
  with W_l: (in, out) kernels (LeCun-normal init) and zero-initialised biases.
  LeCun et al. 1998, "Gradient-Based Learning Applied to Document Recognition" (LeNet-300-100).

  Attributes:
    num_classes: C, the number of logits.
    hidden: the hidden widths, e.g. (300, 100); () is a linear classifier.
    activation: "relu" | "gelu" | "tanh".
    dtype: the compute dtype (params stay float32).
  """

  num_classes: int
  hidden: Sequence[int] = (300, 100)
  activation: str = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BD: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del deterministic  # No dropout.
    self._check()
    act = ACTIVATIONS[self.activation]
    h_BD = x_BD.reshape(x_BD.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.hidden):
      h_BD = act(Linear(width, "mlp", self.dtype, name=f"layer_{i}")(h_BD))
    return Linear(self.num_classes, "vocab", self.dtype, name="head")(h_BD), empty_aux()

  def _check(self) -> None:
    if self.num_classes < 1:
      raise ValueError(f"MLP num_classes={self.num_classes} must be >= 1")
    if any(int(w) < 1 for w in self.hidden):
      raise ValueError(f"MLP hidden={tuple(self.hidden)} must be positive widths")
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"MLP activation={self.activation!r}; allowed: {', '.join(sorted(ACTIVATIONS))}")


def lenet_300_100(num_classes: int, **kwargs) -> MLP:
  """LeNet-300-100: an MLP with ReLU hidden layers of 300 and 100 units (266k params on MNIST).

  LeCun et al. 1998; the standard sparse-training benchmark MLP (e.g. Lee et al. 2019, SNIP).
  """
  if "hidden" in kwargs:
    raise ValueError("lenet_300_100 fixes hidden=(300, 100); use model name 'mlp' to change it")
  return MLP(num_classes=num_classes, hidden=(300, 100), **kwargs)


lenet_300_100.module_class = MLP
lenet_300_100.fixed_fields = ("hidden",)
MODELS.register("lenet_300_100")(lenet_300_100)


def build_classifier(model_config: Mapping[str, Any], num_classes: int) -> nn.Module:
  """The registered classifier `model_config["name"]` built with the config's other entries.

  Raises a ValueError naming unknown models (with the allowed names) or unknown arguments.
  """
  config = dict(model_config)
  if "name" not in config:
    raise ValueError(f"classifier config needs a 'name' field, got keys {sorted(config)}")
  name = config.pop("name")
  ctor = MODELS.get(name)
  module_class = getattr(ctor, "module_class", ctor)
  allowed = ({f.name for f in dataclasses.fields(module_class)} - {"parent", "name", "num_classes"}
             - set(getattr(ctor, "fixed_fields", ())))
  unknown = sorted(set(config) - allowed)
  if unknown:
    raise ValueError(f"unknown arguments {unknown} for model {name!r}; allowed: "
                     f"{', '.join(sorted(allowed))}")
  if "hidden" in config:
    config["hidden"] = tuple(int(w) for w in config["hidden"])
  if isinstance(config.get("dtype"), str):
    config["dtype"] = jnp.dtype(config["dtype"])
  return ctor(num_classes=num_classes, **config)
