"""Reference models with pluggable FFN and attention layers, and the layer contract.

Layer contract (how `TransformerLM` builds a block's layers; a new layer that follows it plugs
in by registering itself, without edits to the model):

* FFN: a Flax Linen Module class registered with `@FFNS.register("name")` (from
  `sparsejax.registry`). Each block builds it as

      FFNS.get(name)(d_model=d_model, d_ff=d_ff, dtype=dtype, name="ffn", **ffn_kwargs)

  passing `d_model` and `dtype` (the compute dtype; keep params float32) always, so the class
  must declare these two fields, and `d_ff` only when the class declares it (the hidden width:
  the dense FFN's, each expert's in an MoE layer; a memory layer has none). `ffn_kwargs` are
  the other entries of the config's `model.ffn` (everything but `name`); `build_lm` rejects
  keys that are not fields of the class, and keys that the model sets.
* FFN options, declared as class attributes (absent means False):
  - `takes_token_ids: ClassVar[bool] = True` (e.g. "hash_moe", which routes by token id): the
    model also passes its `vocab_size` to the constructor (so the class declares that field and
    configs must not set it) and calls the layer as
    `ffn(x_BTD, token_ids_BT=tokens_BT, deterministic=...)` with the model's int input tokens.
  - `shares_router: ClassVar[bool] = True` (e.g. "moe") lets `TransformerLM(shared_router=True)`
    use the FFN: the class defines `router_param(self, owner, name) -> w_DE`, which creates its
    router weight as param `name` of the module `owner` (the model calls it on an instance built
    with `parent=None` to create `params["shared_router"]`), and its call accepts
    `router_DE=w_DE`, used instead of its own router param (which it then does not create).
  - `shares_values: ClassVar[bool] = True` (e.g. "pkm") lets
    `TransformerLM(shared_memory_values=True)` use the FFN: the class defines
    `values_param(self, owner, name) -> v_ND`, which the model calls to create
    `params["shared_memory_values"]`, and its call accepts `values_ND=v_ND`, read instead of its
    own value table (which it then does not create).
* Input embedding (optional): `model.embedding={"name": ...}` other than "table" is a Linen
  Module registered with `@EMBEDDINGS.register("name")`, built as
  `EMBEDDINGS.get(name)(vocab_size=..., d_model=..., dtype=..., name="embed", **kwargs)`
  (`vocab_size` only when the class declares it) and called as `embed(tokens_BT) -> x_BTD`;
  it must be causal (position t sees tokens <= t) and the model then needs
  `tie_embeddings=False`.
  - `takes_feature_maps: ClassVar[bool] = True` (e.g. "conv_moe"): the layer takes a
    `(B, H, W, C)` feature map instead of `(B, T, D)` tokens; `SmallCNN` passes its maps as
    is (other FFNs get the H W positions as tokens). Such layers do not fit `TransformerLM`.
* Attention: registered with `@ATTENTIONS.register("name")`, built as

      ATTENTIONS.get(name)(d_model=d_model, num_heads=num_heads, positions=positions,
                           dtype=dtype, name="attention", **attention_kwargs)

  `positions` is "rope" (the layer must apply rotary embeddings to its queries and keys, e.g.
  with `sparsejax.models.apply_rope`) or "learned" (the model adds them to its input; the layer
  does nothing). The layer must be causal. A class that declares `max_len` also gets the
  model's (e.g. the token-mixing MLPs "token_mlp" / "token_moe", whose spatial weights are
  max_len x max_len); configs must not set it.
* LM architecture: `model.architecture={"name": ...}` picks a `TransformerLM` subclass
  registered with `@LMS.register("name")`, built by `build_lm` with every TransformerLM field
  plus the entry's other keys as its own fields; it reuses the embedding and head and overrides
  `_apply_blocks(x_BTD, tokens_BT, *, deterministic) -> (x_BTD, aux)` (e.g. "universal", one
  shared block applied recurrently with halting, `sparsejax.models.universal`).
* Call: `layer(x_BTD, *, deterministic: bool) -> (y_BTD, aux)`, `deterministic` keyword-only,
  with y_BTD of x_BTD's shape and `aux = {"losses": {name: scalar}, "metrics": {name: array}}`
  (`sparsejax.auxiliary.empty_aux()` when there is nothing). The model merges every block's aux
  with keys prefixed by the block path, e.g. "layer_1/ffn/load_balance"; the trainer adds
  `sparsejax.total_aux_loss(aux)` to the task loss (so scale a loss by its coefficient inside
  the layer) and logs `aux["metrics"]`. Randomness, when `deterministic` is False, comes from
  Linen rng streams (`self.make_rng`).
* Params are created with logical axis names (`nn.with_logical_partitioning`, or
  `sparsejax.models.layers.logical_param`) from the names in `sparsejax.sharding`, e.g.
  expert weights ("expert", "embed", "mlp").
"""
from sparsejax.models.cnn import SmallCNN
from sparsejax.models.layers import (
    CausalSelfAttention,
    DenseFFN,
    apply_rope,
    logical_param,
)
from sparsejax.models.mlp import MLP, build_classifier, lenet_300_100
from sparsejax.models.recsys import DLRM
from sparsejax.models.universal import UniversalLM
from sparsejax.models.transformer import (
    ATTENTION_CONTRACT,
    FFN_CONTRACT,
    FFN_OPTIONAL,
    TOKEN_IDS_CONTRACT,
    DecoderBlock,
    TransformerLM,
    build_lm,
)

__all__ = [
    "ATTENTION_CONTRACT",
    "FFN_CONTRACT",
    "FFN_OPTIONAL",
    "CausalSelfAttention",
    "DLRM",
    "DecoderBlock",
    "DenseFFN",
    "MLP",
    "SmallCNN",
    "TOKEN_IDS_CONTRACT",
    "TransformerLM",
    "UniversalLM",
    "apply_rope",
    "build_classifier",
    "build_lm",
    "lenet_300_100",
    "logical_param",
]
