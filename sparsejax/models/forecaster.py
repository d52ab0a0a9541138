"""Decoder-only patch forecaster: patches of a series are tokens, each predicts the next patch.

Shape letters beyond the DESIGN legend: P the patch size (steps per token), F the number of
sampling frequencies (only here; a hidden width is d_ff).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sparsejax.auxiliary import Aux, empty_aux, merge_aux
from sparsejax.models.layers import POSITIONS
from sparsejax.models.transformer import (
    ACTIVATION_AXES,
    ATTENTION_CONTRACT,
    ATTENTION_OPTIONAL,
    FFN_CONTRACT,
    FFN_OPTIONAL,
    DecoderBlock,
    Kwargs,
    _check_layer_kwargs,
    _split_layer_config,
)
from sparsejax.registry import ATTENTIONS, FFNS

PROJECTIONS = ("shared", "per_frequency")


def patch_series(series_BL: jax.Array, patch_size: int) -> jax.Array:
  """x_BTP[b, t, p] = series_BL[b, t P + p]: non-overlapping patches, T = L / P (P divides L)."""
  batch, length = series_BL.shape
  if patch_size < 1 or length % patch_size:
    raise ValueError(f"patch_size={patch_size} must be >= 1 and divide the series length "
                     f"{length}")
  return series_BL.reshape(batch, length // patch_size, patch_size)


class PatchForecaster(nn.Module):
  """Patches -> input projection -> causal pre-norm Transformer -> output projection.

  x_t = W_in p_t + b_in (p_t the t-th patch, P values); x_l = block_l(x_{l-1}) (`DecoderBlock`:
  causal attention and the FFN registered as `ffn`); y_t = W_out RMSNorm(x_L)_t + b_out, the
  forecast of patch t + 1. `projection` picks the input/output projections:
    "per_frequency": one (W_in, b_in, W_out, b_out) per sampling frequency, selected by each
      series' frequency index (Moirai's frequency-specific projections);
    "shared": one projection for all series (Moirai-MoE; pair it with ffn="moe" so token-level
      experts, not a hand-assigned frequency, specialise).
  Returns (y_BTP, aux) with aux keys prefixed by the block, e.g. "layer_0/ffn/load_balance".
  Woo et al. 2024, "Unified Training of Universal Time Series Forecasting Transformers"
  (Moirai); Liu et al. 2024, "Moirai-MoE: Empowering Time Series Foundation Models with Sparse
  Mixture of Experts"; Nie et al. 2023, "A Time Series is Worth 64 Words" (patches as tokens).
  """

  patch_size: int
  num_frequencies: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  max_len: int
  projection: str = "shared"
  positions: str = "rope"
  ffn: str = "dense"
  ffn_kwargs: Kwargs = ()
  attention: str = "dense"
  attention_kwargs: Kwargs = ()
  dtype: Any = jnp.float32

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self) -> None:
    for field in ("patch_size", "num_frequencies", "d_model", "num_layers", "num_heads", "d_ff",
                  "max_len"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive int, got {value!r}")
    if self.projection not in PROJECTIONS:
      raise ValueError(f"projection={self.projection!r}; allowed: {', '.join(PROJECTIONS)}")
    if self.positions not in POSITIONS:
      raise ValueError(f"positions={self.positions!r}; allowed: {', '.join(POSITIONS)}")
    if getattr(FFNS.get(self.ffn), "takes_token_ids", False):
      raise ValueError(f"ffn {self.ffn!r} routes by token id, which series patches do not have")
    _check_layer_kwargs(FFNS, self.ffn, FFN_CONTRACT, self.ffn_kwargs, FFN_OPTIONAL)
    _check_layer_kwargs(ATTENTIONS, self.attention, ATTENTION_CONTRACT, self.attention_kwargs,
                        ATTENTION_OPTIONAL)

  @nn.compact
  def __call__(self, patches_BTP: jax.Array, frequency_B: jax.Array | None = None, *,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    """`frequency_B`: int [B] indices of the series' frequencies, read by "per_frequency"
    projections; None selects frequency 0 for every series (enough for `init`)."""
    batch, length, patch_size = patches_BTP.shape
    if patch_size != self.patch_size or length > self.max_len:
      raise ValueError(f"patches of shape {patches_BTP.shape} need patch size {self.patch_size} "
                       f"and at most max_len={self.max_len} patches")
    if frequency_B is None:
      frequency_B = jnp.zeros((batch,), jnp.int32)
    w_in_BPD, b_in_BD = self._projection("in", (self.patch_size, self.d_model), frequency_B)
    x_BTD = jnp.einsum("btp,bpd->btd", patches_BTP.astype(self.dtype), w_in_BPD)
    x_BTD = x_BTD + b_in_BD[:, None, :]
    if self.positions == "learned":
      x_BTD = x_BTD + self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=self.d_model**-0.5), ("length", "embed")),
          (self.max_len, self.d_model), jnp.float32).astype(self.dtype)[:length]
    x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
    aux = empty_aux()
    for layer in range(self.num_layers):
      x_BTD, block_aux = DecoderBlock(
          d_model=self.d_model, num_heads=self.num_heads, d_ff=self.d_ff,
          positions=self.positions, ffn=self.ffn, ffn_kwargs=self.ffn_kwargs,
          attention=self.attention, attention_kwargs=self.attention_kwargs, dtype=self.dtype,
          max_len=self.max_len, name=f"layer_{layer}")(x_BTD, deterministic=deterministic)
      aux = merge_aux(f"layer_{layer}", block_aux, aux)
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    x_BTD = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, scale_init=scale_init,
                       name="final_norm")(x_BTD)
    w_out_BDP, b_out_BP = self._projection("out", (self.d_model, self.patch_size), frequency_B)
    y_BTP = jnp.einsum("btd,bdp->btp", x_BTD, w_out_BDP) + b_out_BP[:, None, :]
    return y_BTP.astype(jnp.float32), aux

  def _projection(self, name: str, shape: tuple[int, int],
                  frequency_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(W [B, in, out], b [B, out]) for each series: one shared projection, or the one of the
    series' frequency; params "w_{name}" [G, in, out] and "b_{name}" [G, out], G = 1 or F."""
    groups = self.num_frequencies if self.projection == "per_frequency" else 1
    axes = (None, "embed", None) if name == "out" else (None, None, "embed")
    w_GIO = self.param(f"w_{name}", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)), axes),
        (groups, *shape), jnp.float32).astype(self.dtype)
    b_GO = self.param(f"b_{name}", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, axes[2])), (groups, shape[1]), jnp.float32)
    index_B = frequency_B if groups > 1 else jnp.zeros_like(frequency_B)
    return w_GIO[index_B], b_GO[index_B].astype(self.dtype)


_MODEL_FIELDS = ("d_model", "num_layers", "num_heads", "d_ff", "max_len", "positions", "ffn",
                 "attention", "dtype")
# `model` config fields of the LM that a forecaster cannot use, with the value it needs.
_LM_ONLY = {"ffn_layers": None, "shared_router": False, "shared_memory_values": False,
            "embedding": {"name": "table"}}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_forecaster(model_config: ml_collections.ConfigDict, *, patch_size: int,
                     num_frequencies: int, projection: str) -> PatchForecaster:
  """The PatchForecaster with the Transformer settings of `model_config` (the LM's `model`
  section: d_model, num_layers, num_heads, d_ff, max_len, positions, ffn, attention, dtype;
  `tie_embeddings` has no meaning here and is ignored); any LM-only setting is a ValueError."""
  config = model_config.to_dict()
  for field, needed in _LM_ONLY.items():
    if config.get(field, needed) != needed:
      raise ValueError(f"model.{field}={config[field]!r} is not supported by the forecaster; "
                       f"it needs {needed!r}")
  if config.get("dtype", "float32") not in _DTYPES:
    raise ValueError(f"model dtype={config['dtype']!r}; allowed: {', '.join(_DTYPES)}")
  ffn, ffn_kwargs = _split_layer_config("ffn", config.get("ffn", {"name": "dense"}))
  attention, attention_kwargs = _split_layer_config(
      "attention", config.get("attention", {"name": "dense"}))
  return PatchForecaster(
      patch_size=patch_size, num_frequencies=num_frequencies, projection=projection,
      **{f: config[f] for f in _MODEL_FIELDS[:5]}, positions=config.get("positions", "rope"),
      ffn=ffn, ffn_kwargs=ffn_kwargs, attention=attention, attention_kwargs=attention_kwargs,
      dtype=_DTYPES[config.get("dtype", "float32")])
