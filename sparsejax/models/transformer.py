"""Decoder-only Transformer language model with pluggable FFN and attention layers.

The FFN and attention of every block are looked up by name in the `FFNS` and `ATTENTIONS`
registries and constructed under the contract documented in `sparsejax.models`, so a new layer
(MoE, hash-routed MoE, memory, sparse attention) plugs in by registering itself, without edits
here. FFNs that route by token id, share one router or one memory value table across layers
declare it with the class attributes `takes_token_ids`, `shares_router` and `shares_values`;
input embeddings other than the plain table come from the `EMBEDDINGS` registry.
"""
import inspect
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sparsejax.auxiliary import Aux, empty_aux, merge_aux
from sparsejax.models.layers import POSITIONS, logical_param
from sparsejax.registry import ATTENTIONS, EMBEDDINGS, FFNS, LMS, Registry
from sparsejax.sites import Site

Kwargs = tuple[tuple[str, Any], ...]

# Every FFN class declares these fields, and the model sets them.
FFN_CONTRACT = ("d_model", "dtype")
# Set by the model only in an FFN class that declares it: the hidden width (each expert's).
FFN_OPTIONAL = ("d_ff",)
# Also passed to an FFN that declares `takes_token_ids`: the range of the ids it receives.
TOKEN_IDS_CONTRACT = ("vocab_size",)
ATTENTION_CONTRACT = ("d_model", "num_heads", "positions", "dtype")
# Set by the model only in an attention class that declares it: the longest sequence (e.g. the
# size of a token-mixing MLP's spatial weights).
ATTENTION_OPTIONAL = ("max_len",)
# Input embeddings other than the plain "table" come from `EMBEDDINGS`: these fields always,
# `vocab_size` when the class declares it.
EMBEDDING_CONTRACT = ("d_model", "dtype")
EMBEDDING_OPTIONAL = ("vocab_size",)
ACTIVATION_AXES = ("batch", "length", "embed")


def contract_fields(layer_cls: type[nn.Module], **offered: Any) -> dict[str, Any]:
  """The `offered` constructor fields that `layer_cls` declares (a model offers every contract
  field; a layer declares only those it uses, e.g. no `d_ff` in a memory layer)."""
  declared = inspect.signature(layer_cls).parameters
  return {field: value for field, value in offered.items() if field in declared}


def _rms_norm(name: str, dtype: Any) -> nn.RMSNorm:
  """RMSNorm y = x / sqrt(mean(x^2) + 1e-6) * scale, scale annotated ("embed",)."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, scale_init=scale_init, name=name)


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x += attention(norm(x)); x += ffn(norm(x)).

  The FFN also receives `token_ids_BT` when its class declares `takes_token_ids`, and
  `router_DE` when one is given (a router weight shared across blocks). The block's aux merges
  the attention's and the FFN's, prefixed "attention/" and "ffn/". Sites (`sparsejax.sites`):
  "resid_pre" (the block's input), "resid_mid" (after the attention is added), "resid_post" (the
  block's output).
  Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture" (pre-norm).
  """

  d_model: int
  num_heads: int
  d_ff: int
  positions: str
  ffn: str
  ffn_kwargs: Kwargs
  attention: str
  attention_kwargs: Kwargs
  dtype: Any
  max_len: int | None = None

  @nn.compact
  def __call__(
      self,
      x_BTD: jax.Array,
      *,
      token_ids_BT: jax.Array | None = None,
      router_DE: jax.Array | None = None,
      values_ND: jax.Array | None = None,
      deterministic: bool = True,
  ) -> tuple[jax.Array, Aux]:
    attention_cls = ATTENTIONS.get(self.attention)
    attention = attention_cls(
        **contract_fields(attention_cls, d_model=self.d_model, num_heads=self.num_heads,
                          positions=self.positions, dtype=self.dtype, max_len=self.max_len),
        name="attention",
        **dict(self.attention_kwargs),
    )
    ffn_cls = FFNS.get(self.ffn)
    ffn = ffn_cls(
        **contract_fields(ffn_cls, d_model=self.d_model, d_ff=self.d_ff, dtype=self.dtype),
        name="ffn",
        **dict(self.ffn_kwargs),
    )
    ffn_inputs = self._ffn_inputs(ffn_cls, token_ids_BT, router_DE)
    if values_ND is not None:  # a memory value table shared across blocks
      ffn_inputs["values_ND"] = values_ND
    x_BTD = Site(name="resid_pre")(x_BTD)
    y_BTD, attention_aux = attention(
        _rms_norm("attention_norm", self.dtype)(x_BTD), deterministic=deterministic
    )
    x_BTD = Site(name="resid_mid")(x_BTD + y_BTD)
    y_BTD, ffn_aux = ffn(
        _rms_norm("ffn_norm", self.dtype)(x_BTD), deterministic=deterministic, **ffn_inputs
    )
    x_BTD = Site(name="resid_post")(nn.with_logical_constraint(x_BTD + y_BTD, ACTIVATION_AXES))
    aux = merge_aux("attention", attention_aux, empty_aux())
    return x_BTD, merge_aux("ffn", ffn_aux, aux)

  def _ffn_inputs(
      self, ffn_cls: type[nn.Module], token_ids_BT: jax.Array | None, router_DE: jax.Array | None
  ) -> dict[str, jax.Array]:
    """The FFN's call arguments beyond x: token ids if its class takes them, a shared router."""
    inputs = {}
    if _takes_token_ids(ffn_cls):
      if token_ids_BT is None:
        raise ValueError(f"ffn {self.ffn!r} routes by token id; call the block with token_ids_BT")
      inputs["token_ids_BT"] = token_ids_BT
    if router_DE is not None:
      inputs["router_DE"] = router_DE
    return inputs


@LMS.register("transformer")
class TransformerLM(nn.Module):
  """Decoder-only Transformer LM: embed, `num_layers` pre-norm blocks, RMSNorm, project to vocab.

  x_0 = E[tokens] (+ P[positions] when positions == "learned"), or with `embedding` other than
  "table" the registered `EMBEDDINGS` module's output (e.g. "hashed" n-gram multi-hot sums);
  x_l = block_l(x_{l-1});
  logits = RMSNorm(x_L) W_out with W_out = E^T when tie_embeddings, else a separate D x V param.
  RMSNorm (not LayerNorm) for its lower cost and equal quality. Layers listed in `ffn_layers`
  (all when None) use the FFN registered as `ffn` with `ffn_kwargs`; the others use "dense" with
  its defaults. `ffn_kwargs` / `attention_kwargs` are tuples of (name, value) pairs so the module
  stays hashable. Logits are float32 whatever `dtype` (the compute dtype) is. Returns
  (logits_BTV, aux) with aux keys prefixed by the block path, e.g. "layer_1/ffn/load_balance".

  An FFN class declaring `takes_token_ids` also gets `vocab_size` and is called with the
  tokens. With `shared_router` (Omni-Router) the model owns one router weight W_r: D x E, the
  param "shared_router", and every selected FFN (whose class must declare `shares_router`)
  computes its router logits as x_l W_r from its own input x_l, so gradients of W_r sum over
  layers. With `shared_memory_values` the model owns one memory value table V: N x D, the param
  "shared_memory_values", read by every selected FFN (whose class must declare `shares_values`,
  e.g. "pkm") with its own queries and keys, so gradients of V sum over layers.
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; Zhang & Sennrich
  2019, "Root Mean Square Layer Normalization"; Press & Wolf 2017, "Using the Output Embedding to
  Improve Language Models" (tying); Gu et al. 2025, "Omni-Router: Sharing Routing Decisions in
  Sparse Mixture-of-Experts" (shared router); Berges et al. 2024, "Memory Layers at Scale"
  (shared memory values).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  max_len: int
  positions: str = "rope"
  tie_embeddings: bool = True
  ffn: str = "dense"
  ffn_kwargs: Kwargs = ()
  ffn_layers: tuple[int, ...] | None = None
  attention: str = "dense"
  attention_kwargs: Kwargs = ()
  shared_router: bool = False
  shared_memory_values: bool = False
  embedding: str = "table"
  embedding_kwargs: Kwargs = ()
  dtype: Any = jnp.float32

  def __post_init__(self):
    _validate_lm(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, Aux]:
    seq_len = tokens_BT.shape[1]
    if seq_len > self.max_len:
      raise ValueError(f"sequence length {seq_len} exceeds max_len={self.max_len}")
    if self.embedding == "table":
      embed = nn.Embed(
          self.vocab_size,
          self.d_model,
          dtype=self.dtype,
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(stddev=self.d_model**-0.5), ("vocab", "embed")
          ),
          name="embed",
      )
    else:  # e.g. "hashed" n-gram multi-hot embeddings; the head is then untied
      embed_cls = EMBEDDINGS.get(self.embedding)
      embed = embed_cls(
          **contract_fields(
              embed_cls, vocab_size=self.vocab_size, d_model=self.d_model, dtype=self.dtype
          ),
          name="embed",
          **dict(self.embedding_kwargs),
      )
    x_BTD = embed(tokens_BT)
    if self.positions == "learned":
      pos_TD = logical_param(
          self,
          "pos_embed",
          nn.initializers.normal(stddev=self.d_model**-0.5),
          (self.max_len, self.d_model),
          ("length", "embed"),
          self.dtype,
      )
      x_BTD = x_BTD + pos_TD[:seq_len]
    x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
    x_BTD, aux = self._apply_blocks(x_BTD, tokens_BT, deterministic=deterministic)
    x_BTD = _rms_norm("final_norm", self.dtype)(x_BTD)
    if self.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      w_DV = logical_param(
          self,
          "lm_head",
          nn.initializers.lecun_normal(),
          (self.d_model, self.vocab_size),
          ("embed", "vocab"),
          self.dtype,
      )
      logits_BTV = x_BTD @ w_DV
    logits_BTV = nn.with_logical_constraint(
        logits_BTV.astype(jnp.float32), ("batch", "length", "vocab")
    )
    return logits_BTV, aux

  def _apply_blocks(
      self, x_BTD: jax.Array, tokens_BT: jax.Array, *, deterministic: bool
  ) -> tuple[jax.Array, Aux]:
    """x_L = block_L(... block_1(x_0)) with the merged aux; LM architectures that reuse this
    model's embedding and head (e.g. "universal") override it."""
    router_DE = self._shared_router() if self.shared_router else None
    values_ND = self._shared_values() if self.shared_memory_values else None
    aux = empty_aux()
    for layer in range(self.num_layers):
      x_BTD, block_aux = self._block(layer)(
          x_BTD,
          token_ids_BT=tokens_BT,
          router_DE=router_DE if self._selected(layer) else None,
          values_ND=values_ND if self._selected(layer) else None,
          deterministic=deterministic,
      )
      aux = merge_aux(f"layer_{layer}", block_aux, aux)
    return x_BTD, aux

  def _selected(self, layer: int) -> bool:
    """Whether block `layer` uses the configured FFN (per `ffn_layers`) rather than "dense"."""
    return self.ffn_layers is None or layer in self.ffn_layers

  def _ffn_kwargs(self) -> Kwargs:
    """The configured FFN's kwargs, plus the model's vocab_size if it takes token ids."""
    if _takes_token_ids(FFNS.get(self.ffn)):
      return (*self.ffn_kwargs, ("vocab_size", self.vocab_size))
    return self.ffn_kwargs

  def _shared_router(self) -> jax.Array:
    """The router weight all selected FFNs share, created by the FFN class as "shared_router"."""
    return self._unbound_ffn().router_param(self, "shared_router")

  def _shared_values(self) -> jax.Array:
    """The memory value table all selected FFNs read, created by the FFN class as
    "shared_memory_values"."""
    return self._unbound_ffn().values_param(self, "shared_memory_values")

  def _unbound_ffn(self) -> nn.Module:
    """The configured FFN built outside the module tree, to create params shared by blocks."""
    ffn_cls = FFNS.get(self.ffn)
    return ffn_cls(
        **contract_fields(ffn_cls, d_model=self.d_model, d_ff=self.d_ff, dtype=self.dtype),
        parent=None,
        **dict(self._ffn_kwargs()),
    )

  def _block(self, layer: int, name: str | None = None) -> DecoderBlock:
    """Block `layer` (named `name`, default f"layer_{layer}"), with the configured FFN when
    selected by `ffn_layers`, else "dense"."""
    selected = self._selected(layer)
    return DecoderBlock(
        d_model=self.d_model,
        num_heads=self.num_heads,
        d_ff=self.d_ff,
        positions=self.positions,
        ffn=self.ffn if selected else "dense",
        ffn_kwargs=self._ffn_kwargs() if selected else (),
        attention=self.attention,
        attention_kwargs=self.attention_kwargs,
        dtype=self.dtype,
        max_len=self.max_len,
        name=name or f"layer_{layer}",
    )


def _validate_lm(lm: TransformerLM) -> None:
  """Raises a one-line ValueError for any inconsistent TransformerLM field."""
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
    value = getattr(lm, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{field} must be a positive int, got {value!r}")
  if lm.d_model % lm.num_heads:
    raise ValueError(f"d_model={lm.d_model} must be divisible by num_heads={lm.num_heads}")
  if lm.positions not in POSITIONS:
    raise ValueError(f"positions={lm.positions!r}; allowed: {', '.join(POSITIONS)}")
  if lm.positions == "rope" and (lm.d_model // lm.num_heads) % 2:
    raise ValueError(
        f"positions='rope' needs an even head dim, got d_model / num_heads = "
        f"{lm.d_model // lm.num_heads}"
    )
  if lm.ffn_layers is not None:
    outside = [layer for layer in lm.ffn_layers if not 0 <= layer < lm.num_layers]
    if outside:
      raise ValueError(
          f"ffn_layers {outside} out of range; allowed: 0..{lm.num_layers - 1}"
      )
  if lm.embedding == "table":
    if lm.embedding_kwargs:
      raise ValueError(f"embedding 'table' takes no kwargs, got {dict(lm.embedding_kwargs)}")
  else:
    _check_layer_kwargs(
        EMBEDDINGS, lm.embedding, EMBEDDING_CONTRACT, lm.embedding_kwargs, EMBEDDING_OPTIONAL
    )
    if lm.tie_embeddings:
      raise ValueError(
          f"embedding {lm.embedding!r} has no vocab table to tie to the output head; set "
          f"tie_embeddings=False"
      )
  ffn_cls = FFNS.get(lm.ffn)
  ffn_contract = FFN_CONTRACT + (TOKEN_IDS_CONTRACT if _takes_token_ids(ffn_cls) else ())
  _check_layer_kwargs(FFNS, lm.ffn, ffn_contract, lm.ffn_kwargs, FFN_OPTIONAL)
  _check_layer_kwargs(ATTENTIONS, lm.attention, ATTENTION_CONTRACT, lm.attention_kwargs,
                     ATTENTION_OPTIONAL)
  if lm.shared_router and not getattr(ffn_cls, "shares_router", False):
    sharing = [name for name in FFNS if getattr(FFNS.get(name), "shares_router", False)]
    raise ValueError(
        f"shared_router=True needs an FFN that can share its router; ffn {lm.ffn!r} cannot; "
        f"allowed: {', '.join(sharing)}"
    )
  if lm.shared_memory_values and not getattr(ffn_cls, "shares_values", False):
    sharing = [name for name in FFNS if getattr(FFNS.get(name), "shares_values", False)]
    raise ValueError(
        f"shared_memory_values=True needs a memory FFN that can share its value table; ffn "
        f"{lm.ffn!r} cannot; allowed: {', '.join(sharing)}"
    )


def _takes_token_ids(ffn_cls: type[nn.Module]) -> bool:
  """Whether the FFN class declares `takes_token_ids` (routes by token id, e.g. hash layers)."""
  return getattr(ffn_cls, "takes_token_ids", False)


def _check_layer_kwargs(
    registry: Registry,
    name: str,
    contract: Sequence[str],
    kwargs: Kwargs,
    optional: Sequence[str] = (),
) -> None:
  """Checks `name` is registered, declares the `contract` fields and every key of `kwargs`.

  Keys of `kwargs` may not be `contract` fields, nor `optional` fields the class declares: the
  model sets those.
  """
  kind = registry.kind
  layer_cls = registry.get(name)
  accepted = inspect.signature(layer_cls).parameters
  missing = [arg for arg in contract if arg not in accepted]
  if missing:
    raise ValueError(
        f"{kind} {name!r} ({layer_cls.__name__}) lacks the contract fields {missing}; "
        f"every {kind} must accept {', '.join(contract)} (see sparsejax.models)"
    )
  model_set = (*contract, *optional)
  own_fields = sorted(set(accepted) - set(model_set) - {"parent", "name"})
  for key, _ in kwargs:
    if key not in accepted or key in ("parent", "name"):
      raise ValueError(
          f"unknown {kind} kwarg {key!r} for {kind} {name!r}; accepted: "
          f"{', '.join(own_fields) or '(none)'}"
      )
    if key in model_set:
      raise ValueError(
          f"{kind} kwarg {key!r} is set by the model from its own {key}; remove it from the "
          f"{kind} kwargs"
      )


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REQUIRED_FIELDS = ("d_model", "num_layers", "num_heads", "d_ff", "max_len")
_OPTIONAL_FIELDS = {
    "positions": "rope",
    "tie_embeddings": True,
    "ffn": {"name": "dense"},
    "ffn_layers": None,
    "attention": {"name": "dense"},
    "shared_router": False,
    "shared_memory_values": False,
    "embedding": {"name": "table"},
    "dtype": "float32",
    "architecture": {"name": "transformer"},
}
# What `build_lm` sets in every `LMS` architecture: the TransformerLM fields.
LM_CONTRACT = ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len", "positions",
               "tie_embeddings", "ffn", "ffn_kwargs", "ffn_layers", "attention",
               "attention_kwargs", "shared_router", "shared_memory_values", "embedding",
               "embedding_kwargs", "dtype")


def build_lm(model_config: ml_collections.ConfigDict, vocab_size: int) -> TransformerLM:
  """The TransformerLM described by `model_config` (a ConfigDict, see below) over `vocab_size`.

  Required fields: d_model, num_layers, num_heads, d_ff, max_len. Optional, with defaults:
  positions="rope", tie_embeddings=True, ffn={"name": "dense"} (a ConfigDict with the registered
  FFN's `name` plus that FFN's own kwargs), ffn_layers=None, attention={"name": "dense"} (same
  form), shared_router=False (one router weight for all MoE layers, see `TransformerLM`),
  shared_memory_values=False (one value table for all memory layers), embedding={"name":
  "table"} (or a registered `EMBEDDINGS` name plus its kwargs, e.g. {"name": "hashed",
  "num_rows": 4096, "max_n": 3, "num_hashes": 2}, which needs tie_embeddings=False), dtype="float32" ("float32" | "bfloat16"),
  architecture={"name": "transformer"} (or another `LMS` name plus its own fields, e.g.
  {"name": "universal", "halting": True}: a TransformerLM subclass taking every field above).
  Any inconsistency is a one-line ValueError.
  """
  config = model_config.to_dict()
  unknown = sorted(set(config) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(
        f"unknown model config fields {unknown}; allowed: "
        f"{', '.join(sorted((*_REQUIRED_FIELDS, *_OPTIONAL_FIELDS)))}"
    )
  missing = [field for field in _REQUIRED_FIELDS if field not in config]
  if missing:
    raise ValueError(f"model config lacks the required fields {missing}")
  config = {**_OPTIONAL_FIELDS, **config}
  if config["dtype"] not in _DTYPES:
    raise ValueError(f"model dtype={config['dtype']!r}; allowed: {', '.join(_DTYPES)}")
  ffn, ffn_kwargs = _split_layer_config("ffn", config["ffn"])
  attention, attention_kwargs = _split_layer_config("attention", config["attention"])
  embedding, embedding_kwargs = _split_layer_config("embedding", config["embedding"])
  architecture, architecture_kwargs = _split_layer_config("architecture", config["architecture"])
  _check_layer_kwargs(LMS, architecture, LM_CONTRACT, architecture_kwargs)
  ffn_layers = config["ffn_layers"]
  return LMS.get(architecture)(
      vocab_size=vocab_size,
      d_model=config["d_model"],
      num_layers=config["num_layers"],
      num_heads=config["num_heads"],
      d_ff=config["d_ff"],
      max_len=config["max_len"],
      positions=config["positions"],
      tie_embeddings=config["tie_embeddings"],
      ffn=ffn,
      ffn_kwargs=ffn_kwargs,
      ffn_layers=None if ffn_layers is None else tuple(ffn_layers),
      attention=attention,
      attention_kwargs=attention_kwargs,
      shared_router=config["shared_router"],
      shared_memory_values=config["shared_memory_values"],
      embedding=embedding,
      embedding_kwargs=embedding_kwargs,
      dtype=_DTYPES[config["dtype"]],
      **dict(architecture_kwargs),
  )


def _split_layer_config(kind: str, layer_config: dict[str, Any]) -> tuple[str, Kwargs]:
  """Splits `{"name": ..., **kwargs}` into the name and sorted, hashable (key, value) pairs."""
  if "name" not in layer_config:
    raise ValueError(f"model.{kind} needs a 'name' field, got keys {sorted(layer_config)}")
  kwargs = tuple(
      (key, tuple(value) if isinstance(value, list) else value)
      for key, value in sorted(layer_config.items())
      if key != "name"
  )
  return layer_config["name"], kwargs
