"""Mixture of experts over the positions of a convolutional feature map (NHWC).

Every position (b, h, w) of x_BHWC is a token x_bhw in R^C; the MoE layer's router picks its
experts and each expert is a 1x1 convolution pair, i.e. a per-position FFN:

  y_bhw = sum_k g_bhw,k FFN_{e_bhw,k}(x_bhw)    (+ shared experts' FFN(x_bhw)),

so ConvMoE(x)[b, h, w] = MoE(x reshaped to (B, H W, C))[b, h W + w]. All B H W positions form one
routing group. As V-MoE routes the patch tokens of a ViT (Riquelme et al., 2021, "Scaling
Vision with Sparse Mixture of Experts"), here the pointwise MLP of a conv block is the sparse
layer (the ConvNeXt block's 1x1 MLP: Liu et al., 2022, "A ConvNet for the 2020s").

Shape letters beyond the DESIGN legend: H, W the feature map's height and width, C its channels
(the layer's d_model).
"""
from typing import ClassVar

import flax.linen as nn
import jax

from sparsejax.auxiliary import Aux
from sparsejax.moe.layers import MoE
from sparsejax.registry import FFNS


@FFNS.register("conv_moe")
class ConvMoE(MoE):
  """The MoE layer on the H W positions of an NHWC map: `(B, H, W, C)` -> `(B, H, W, C)`.

  Fields, params, routers, capacity and aux are exactly the MoE layer's (d_model = C), and so
  is the path: the map is reshaped to its B H W tokens for the same `core.moe_apply`; only the
  input layout differs, hence a subclass that changes `__call__` alone. `takes_feature_maps`
  tells a model (`sparsejax.models.SmallCNN`) to pass the map as is; a TransformerLM cannot
  use it.
  """
  takes_feature_maps: ClassVar[bool] = True
  shares_router: ClassVar[bool] = False  # no model of feature maps shares routers

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, deterministic: bool = True,
               router_DE: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Returns (y_BHWC, aux), aux as MoE's. `router_DE`: see MoE."""
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != self.d_model:
      raise ValueError(f"conv_moe needs a 4-D (B, H, W, C) feature map with C = d_model = "
                       f"{self.d_model}, got shape {x_BHWC.shape}; use 'moe' for (B, T, D) "
                       f"token sequences")
    y_TC, aux = self._tokens(x_BHWC.reshape(-1, self.d_model), deterministic=deterministic,
                             router_DE=router_DE)
    return y_TC.reshape(x_BHWC.shape), aux
