"""A small ConvNeXt-style image classifier whose pointwise FFN is any registered FFN.

x_0 = conv_kxk(image); block l: x_l = x_{l-1} + FFN_l(LN(dwconv_kxk(x_{l-1}))) where FFN_l acts on
each position's C-vector (ConvNeXt's 1x1 MLP); logits = LN(mean_hw x_L) W_head. FFN_l is looked
up by name in `FFNS` and built under the layer contract of `sparsejax.models` with d_model = C:
"dense", "moe" (the B H W positions passed as (B, H W, C) tokens), "conv_moe" (feature-map FFNs
declaring `takes_feature_maps` get (B, H, W, C) as is), ... Every block's aux is merged under
"block_{l}/ffn/". Liu et al., 2022, "A ConvNet for the 2020s" (the block); Riquelme et al.,
2021, "Scaling Vision with Sparse Mixture of Experts" (MoE in place of the MLP).

Shape letters beyond the DESIGN legend: H, W the image height and width (not heads), C
channels, Y classes.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.auxiliary import Aux, empty_aux, merge_aux
from sparsejax.models.transformer import (
    FFN_CONTRACT,
    FFN_OPTIONAL,
    Kwargs,
    _check_layer_kwargs,
    contract_fields,
)
from sparsejax.registry import FFNS, MODELS

_KERNEL_AXES = (None, None, None, "embed")


def _conv(features: int, kernel_size: int, groups: int, name: str, dtype: Any) -> nn.Conv:
  """A 'SAME' kxk conv whose kernel's output axis is annotated "embed"."""
  kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), _KERNEL_AXES)
  bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
  return nn.Conv(features, (kernel_size, kernel_size), padding="SAME",
                 feature_group_count=groups, kernel_init=kernel_init, bias_init=bias_init,
                 dtype=dtype, name=name)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(
      dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class ConvBlock(nn.Module):
  """x + FFN(LN(dwconv_kxk(x))) on `(B, H, W, C)`; returns (y_BHWC, aux under "ffn/")."""
  channels: int
  d_ff: int
  kernel_size: int
  ffn: str
  ffn_kwargs: Kwargs
  dtype: Any
  num_classes: int | None = None  # the classifier's, given to an FFN that `takes_labels`

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, deterministic: bool = True,
               labels_B: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    ffn_cls = FFNS.get(self.ffn)
    ffn_kwargs = dict(self.ffn_kwargs)
    if getattr(ffn_cls, "takes_labels", False) and self.num_classes is not None:
      if ffn_kwargs.setdefault("num_classes", self.num_classes) != self.num_classes:
        raise ValueError(f"ffn {self.ffn!r} num_classes={ffn_kwargs['num_classes']}, but the "
                         f"classifier has {self.num_classes} classes: leave it unset")
    labels = ({"labels_B": labels_B}
              if labels_B is not None and getattr(ffn_cls, "takes_labels", False) else {})
    ffn = ffn_cls(**contract_fields(ffn_cls, d_model=self.channels, d_ff=self.d_ff,
                                    dtype=self.dtype),
                  name="ffn", **ffn_kwargs)
    h_BHWC = _conv(self.channels, self.kernel_size, self.channels, "dwconv", self.dtype)(x_BHWC)
    h_BHWC = _layer_norm("norm", self.dtype)(h_BHWC)
    if getattr(ffn_cls, "takes_feature_maps", False):
      y_BHWC, ffn_aux = ffn(h_BHWC, deterministic=deterministic, **labels)
    else:
      batch, height, width, channels = h_BHWC.shape
      y_BTC, ffn_aux = ffn(h_BHWC.reshape(batch, height * width, channels),
                           deterministic=deterministic, **labels)
      y_BHWC = y_BTC.reshape(h_BHWC.shape)
    return x_BHWC + y_BHWC, merge_aux("ffn", ffn_aux, empty_aux())


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
  """Conv stem, `num_blocks` ConvNeXt blocks with pluggable pointwise FFNs, pool, linear head.

  Attributes:
    num_classes: Y. channels: C, the width of every block. num_blocks: blocks.
    d_ff: hidden width passed to each block's FFN that declares it (each expert's for MoE
      layers).
    kernel_size: of the stem and the depthwise convs.
    ffn: an `FFNS` name for the blocks in `ffn_blocks` (all when None); other blocks use
      "dense". ffn_kwargs: that FFN's own arguments, (name, value) pairs or a mapping. FFNs
      that route by token id (`takes_token_ids`) have no ids here and are rejected.
    image_shape: (H, W, C) of the images when they come flattened, as a classification
      task's `(B, H W C)` features (e.g. (8, 8, 1) for the digits); None takes 4-D images only.
    dtype: compute dtype; params and logits are float32.

  Call: `model(images_BHWC, deterministic=True, labels_B=None) -> (logits_BY, aux)`; images
  must be 4-D, or 2-D `(B, H W C)` with `image_shape` set. `labels_B` (the "classify" task
  passes the targets when training, as the model `takes_labels`) reach the FFNs that declare
  `takes_labels` (class-constrained routing, `sparsejax.moe.class_constrained`).
  """
  takes_labels: ClassVar[bool] = True
  num_classes: int
  channels: int = 32
  num_blocks: int = 2
  d_ff: int = 64
  kernel_size: int = 3
  ffn: str = "dense"
  ffn_kwargs: Kwargs = ()
  ffn_blocks: tuple[int, ...] | None = None
  image_shape: tuple[int, int, int] | None = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self) -> None:
    for field in ("num_classes", "channels", "num_blocks", "d_ff", "kernel_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
    ffn_cls = FFNS.get(self.ffn)
    if getattr(ffn_cls, "takes_token_ids", False):
      raise ValueError(f"ffn {self.ffn!r} routes by token id, which images do not have")
    _check_layer_kwargs(FFNS, self.ffn, FFN_CONTRACT, self._kwargs(), FFN_OPTIONAL)
    if self.image_shape is not None and (
        len(self.image_shape) != 3 or any(int(n) < 1 for n in self.image_shape)):
      raise ValueError(f"image_shape must be 3 positive ints (H, W, C), got {self.image_shape!r}")
    if self.ffn_blocks is not None:
      outside = [block for block in self.ffn_blocks if not 0 <= block < self.num_blocks]
      if outside:
        raise ValueError(f"ffn_blocks {outside} out of range; allowed: 0..{self.num_blocks - 1}")

  def _kwargs(self) -> Kwargs:
    """`ffn_kwargs` (pairs or a mapping) as sorted (name, value) pairs."""
    return tuple(sorted(dict(self.ffn_kwargs).items()))

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, deterministic: bool = True,
               labels_B: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    if images_BHWC.ndim == 2 and self.image_shape is not None:
      images_BHWC = images_BHWC.reshape(images_BHWC.shape[0], *self.image_shape)
    if images_BHWC.ndim != 4:
      raise ValueError(f"images must be 4-D (batch, height, width, channels), or 2-D with "
                       f"image_shape set, got shape {images_BHWC.shape}")
    x_BHWC = _conv(self.channels, self.kernel_size, 1, "stem", self.dtype)(
        images_BHWC.astype(self.dtype))
    aux = empty_aux()
    for block in range(self.num_blocks):
      selected = self.ffn_blocks is None or block in self.ffn_blocks
      x_BHWC, block_aux = ConvBlock(
          channels=self.channels, d_ff=self.d_ff, kernel_size=self.kernel_size,
          ffn=self.ffn if selected else "dense", ffn_kwargs=self._kwargs() if selected else (),
          dtype=self.dtype, num_classes=self.num_classes,
          name=f"block_{block}")(x_BHWC, deterministic=deterministic, labels_B=labels_B)
      aux = merge_aux(f"block_{block}", block_aux, aux)
    pooled_BC = _layer_norm("final_norm", self.dtype)(jnp.mean(x_BHWC, axis=(1, 2)))
    head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ("embed", None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
    return head(pooled_BC).astype(jnp.float32), aux
