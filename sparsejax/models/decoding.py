"""Generation with a KV cache for `TransformerLM`: prefill, one decode step, a sampling loop.

An explicit functional path beside the training model, which it does not change: it reads the
LM's params tree (embed, pos_embed, layer_l/{attention_norm, attention/{wq, wk, wv, wo},
ffn_norm, ffn}, final_norm, lm_head), computes each block as `DecoderBlock` does for one new
token, keeps keys and values in a `sparsejax.attention.decode.KVCache`, and attends with the
token selection of `sparsejax.attention.decode` as a per-layer plan says. The FFN of every block
is the registered module built under the model's contract, applied to the block's ffn params,
so any FFN that needs no extra inputs works.

Shape letters beyond the DESIGN legend: K the per-head dim, V the vocabulary, L layers.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from sparsejax.attention import decode
from sparsejax.models.layers import apply_rope
from sparsejax.models.transformer import TransformerLM, contract_fields
from sparsejax.registry import FFNS

# Attention kinds whose params are exactly wq, wk, wv, wo under softmax attention; decoding
# replaces their training-time pattern with the cache's selection.
DECODABLE_ATTENTIONS = ("dense", "block_sparse")


def check_decodable(model: TransformerLM) -> None:
  """One-line ValueErrors for LM features this decoding path does not compute."""
  if type(model) is not TransformerLM:
    raise ValueError(f"{type(model).__name__} cannot be decoded token by token here; allowed: "
                     f"the plain TransformerLM (model.architecture 'transformer')")
  if model.embedding != "table":
    raise ValueError(f"embedding={model.embedding!r} cannot be decoded token by token here; "
                     f"allowed: 'table'")
  if model.attention not in DECODABLE_ATTENTIONS:
    raise ValueError(f"attention={model.attention!r} cannot be decoded with a KV cache; allowed: "
                     f"{', '.join(DECODABLE_ATTENTIONS)}")
  ffn_cls = FFNS.get(model.ffn)
  for flag in ("takes_token_ids", "shares_router", "shares_values"):
    if getattr(ffn_cls, flag, False):
      raise ValueError(f"ffn={model.ffn!r} declares {flag} (it needs inputs beyond x); decoding "
                       f"supports FFNs without extra inputs")
  if model.shared_router or model.shared_memory_values:
    raise ValueError("decoding does not support shared_router / shared_memory_values")


def prefill(model: TransformerLM, variables: dict, prompt_BT: jax.Array, *,
            page_size: int = 0) -> tuple[jax.Array, decode.KVCache]:
  """(logits_BTV, cache): the LM's logits on the prompt and a cache of `model.max_len` slots
  holding the prompt's keys and values of every layer (and page summaries when page_size > 0).

  Causal attention over the prompt as in `CausalSelfAttention`, so the logits equal
  `model.apply(variables, prompt_BT)[0]` for attention="dense" (a "block_sparse" model's
  pattern is replaced by full causal attention, as in `decode_step`).
  """
  check_decodable(model)
  batch, length = prompt_BT.shape
  if length > model.max_len:
    raise ValueError(f"prompt length {length} exceeds max_len={model.max_len}")
  variables = meta.unbox(variables)
  cache = decode.init_cache(model.num_layers, batch, model.num_heads, model.max_len,
                            model.d_model // model.num_heads, page_size=page_size,
                            dtype=model.dtype)
  x_BTD = _embed(model, variables, prompt_BT, jnp.arange(length))
  for layer in range(model.num_layers):
    block = _block_variables(variables, layer)
    q_BTHK, k_BTHK, v_BTHK = _qkv(model, block, x_BTD, jnp.arange(length)[None])
    cache = decode.extend(cache, layer, k_BTHK.swapaxes(1, 2), v_BTHK.swapaxes(1, 2))
    o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
    x_BTD = _ffn_residual(model, block, layer, x_BTD + _project_out(block, o_BTHK))
  return _logits(model, variables, x_BTD), cache


def decode_step(model: TransformerLM, variables: dict, cache: decode.KVCache, token_B: jax.Array,
                plan: tuple[str, ...] | None = None, selection: str = "full",
                budget: int | None = None, *, sink: int = 0,
                recent: int = 0) -> tuple[jax.Array, decode.KVCache, dict[str, jax.Array]]:
  """(logits_BV, cache, stats): the LM's next-token logits after `token_B`, which is appended
  to the cache at position n = lengths_L[0].

  Per layer l: h = RMSNorm(x); q, k, v of h (RoPE at position n); k, v appended to the cache;
  o from `decode.attend` as plan[l] says (`decode.ACTIONS`; plan None: every layer "sparse",
  i.e. selects for itself) with `selection`, `budget`, `sink`, `recent`; x += o W_o;
  x += FFN(RMSNorm(x)). A budget >= max_len attends fully everywhere, equal to "full".
  stats: "attended_fraction" (mean over layers) and "attended_fraction_L" (per layer), each the
  fraction of the n + 1 cached tokens attended, averaged over batch and heads.
  """
  check_decodable(model)
  plan = decode.selection_plan(model.num_layers, "every_layer") if plan is None else plan
  decode.check_plan(plan, model.num_layers)
  decode.check_selection(cache, selection, budget, sink, recent)
  sparse = selection != "full" and budget < cache.max_len
  variables = meta.unbox(variables)
  pos = cache.lengths_L[0]
  x_BTD = _embed(model, variables, token_B[:, None], pos[None])
  chosen_BHN, fractions = None, []
  for layer, action in enumerate(plan):
    block = _block_variables(variables, layer)
    q_BTHK, k_BTHK, v_BTHK = _qkv(model, block, x_BTD, pos[None, None])
    q_BHK = q_BTHK[:, 0]
    cache = decode.append(cache, layer, k_BTHK[:, 0], v_BTHK[:, 0])
    if not sparse or action in ("full", "select"):
      o_BHK, _, fraction = decode.attend(q_BHK, cache, layer)
      if sparse and action == "select":
        chosen_BHN = decode.select(q_BHK, cache, layer, selection, budget, sink=sink,
                                   recent=recent)
    else:
      o_BHK, idx_BHN, fraction = decode.attend(
          q_BHK, cache, layer, selection, budget, chosen_BHN if action == "reuse" else None,
          sink=sink, recent=recent)
      chosen_BHN = idx_BHN
    fractions.append(fraction)
    x_BTD = _ffn_residual(model, block, layer, x_BTD + _project_out(block, o_BHK[:, None]))
  fraction_L = jnp.stack(fractions)
  stats = {"attended_fraction": fraction_L.mean(), "attended_fraction_L": fraction_L}
  return _logits(model, variables, x_BTD)[:, 0], cache, stats


def teacher_forced(model: TransformerLM, variables: dict, tokens_BT: jax.Array,
                   prompt_len: int = 1, plan: tuple[str, ...] | None = None,
                   selection: str = "full", budget: int | None = None, *, sink: int = 0,
                   recent: int = 0, page_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """(logits_BTV, attended_fraction_T): prefill of the first `prompt_len` tokens, then one
  `decode_step` per later token fed the true token (lax.scan); the fraction is 1 on the prompt.
  Needs T <= max_len (the cache's size).
  """
  if not 1 <= prompt_len <= tokens_BT.shape[1]:
    raise ValueError(f"prompt_len={prompt_len} must be in [1, {tokens_BT.shape[1]}]")
  if tokens_BT.shape[1] > model.max_len:
    raise ValueError(f"tokens length {tokens_BT.shape[1]} exceeds max_len={model.max_len}, the "
                     f"KV cache's size")
  logits_BPV, cache = prefill(model, variables, tokens_BT[:, :prompt_len], page_size=page_size)
  step = functools.partial(decode_step, model, variables, plan=plan, selection=selection,
                           budget=budget, sink=sink, recent=recent)

  def body(cache, token_B):
    logits_BV, cache, stats = step(cache, token_B)
    return cache, (logits_BV, stats["attended_fraction"])

  _, (logits_TBV, fraction_T) = jax.lax.scan(body, cache, tokens_BT[:, prompt_len:].T)
  logits_BTV = jnp.concatenate([logits_BPV, logits_TBV.swapaxes(0, 1)], axis=1)
  fraction_T = jnp.concatenate([jnp.ones(prompt_len, jnp.float32), fraction_T])
  return logits_BTV, fraction_T


def generate(model: TransformerLM, variables: dict, prompt_BT: jax.Array, num_new_tokens: int,
             *, plan: tuple[str, ...] | None = None, selection: str = "full",
             budget: int | None = None, sink: int = 0, recent: int = 0, page_size: int = 0,
             temperature: float = 0.0,
             rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(tokens_BN, attended_fraction_N): N new tokens after the prompt, each the argmax of the
  logits (temperature 0) or drawn from softmax(logits / temperature) with `rng`; the first comes
  from the prefill (fraction 1), the others from `decode_step`s under lax.scan.
  Needs T + N - 1 <= max_len (the cache's size).
  """
  length = prompt_BT.shape[1]
  if num_new_tokens < 1 or length + num_new_tokens - 1 > model.max_len:
    raise ValueError(f"num_new_tokens={num_new_tokens} must be >= 1 with prompt length {length} "
                     f"+ num_new_tokens - 1 <= max_len={model.max_len}")
  if temperature < 0 or (temperature > 0 and rng is None):
    raise ValueError(f"temperature={temperature} must be 0 (greedy) or > 0 with an rng")
  rng = jax.random.key(0) if rng is None else rng

  def pick(logits_BV, step):
    if temperature == 0:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits_BV / temperature)

  logits_BTV, cache = prefill(model, variables, prompt_BT, page_size=page_size)
  first_B = pick(logits_BTV[:, -1], 0)
  step = functools.partial(decode_step, model, variables, plan=plan, selection=selection,
                           budget=budget, sink=sink, recent=recent)

  def body(carry, index):
    cache, token_B = carry
    logits_BV, cache, stats = step(cache, token_B)
    token_B = pick(logits_BV, index).astype(jnp.int32)
    return (cache, token_B), (token_B, stats["attended_fraction"])

  _, (tokens_NB, fraction_N) = jax.lax.scan(body, (cache, first_B.astype(jnp.int32)),
                                            jnp.arange(1, num_new_tokens))
  tokens_BN = jnp.concatenate([first_B[:, None], tokens_NB.T], axis=1)
  return tokens_BN, jnp.concatenate([jnp.ones(1, jnp.float32), fraction_N])


def _block_variables(variables: dict, layer: int) -> dict[str, Any]:
  """{collection: layer_l's subtree} for every collection holding layer `layer`."""
  name = f"layer_{layer}"
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def _rms_norm(model: TransformerLM, scale_params: dict, x_BTD: jax.Array) -> jax.Array:
  """The block's RMSNorm (epsilon 1e-6) with its params."""
  return nn.RMSNorm(epsilon=1e-6, dtype=model.dtype).apply({"params": scale_params}, x_BTD)


def _embed(model: TransformerLM, variables: dict, tokens_BT: jax.Array,
           positions_T: jax.Array) -> jax.Array:
  """x_BTD = E[tokens] (+ P[positions] for learned positions)."""
  params = variables["params"]
  embed = nn.Embed(model.vocab_size, model.d_model, dtype=model.dtype)
  x_BTD = embed.apply({"params": params["embed"]}, tokens_BT)
  if model.positions == "learned":
    x_BTD = x_BTD + jnp.take(params["pos_embed"].astype(model.dtype), positions_T, axis=0)
  return x_BTD


def _qkv(model: TransformerLM, block: dict, x_BTD: jax.Array,
         positions_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v (each [B, T, H, K]) of RMSNorm(x), with RoPE at `positions` for rope models."""
  params = block["params"]
  h_BTD = _rms_norm(model, params["attention_norm"], x_BTD).astype(model.dtype)
  q_BTHK, k_BTHK, v_BTHK = (
      jnp.einsum("btd,dhk->bthk", h_BTD, params["attention"][name].astype(model.dtype))
      for name in ("wq", "wk", "wv"))
  if model.positions == "rope":
    wavelength = dict(model.attention_kwargs).get("rope_max_wavelength", 10_000.0)
    q_BTHK = apply_rope(q_BTHK, positions_BT, wavelength)
    k_BTHK = apply_rope(k_BTHK, positions_BT, wavelength)
  return q_BTHK, k_BTHK, v_BTHK


def _project_out(block: dict, o_BTHK: jax.Array) -> jax.Array:
  """y = concat_h(o_h) W_o."""
  w_HKD = block["params"]["attention"]["wo"]
  return jnp.einsum("bthk,hkd->btd", o_BTHK, w_HKD.astype(o_BTHK.dtype))


def _ffn_residual(model: TransformerLM, block: dict, layer: int, x_BTD: jax.Array) -> jax.Array:
  """x + FFN(RMSNorm(x)), the block's registered FFN applied to its ffn variables."""
  selected = model.ffn_layers is None or layer in model.ffn_layers
  name, kwargs = (model.ffn, dict(model.ffn_kwargs)) if selected else ("dense", {})
  ffn_cls = FFNS.get(name)
  ffn = ffn_cls(**contract_fields(ffn_cls, d_model=model.d_model, d_ff=model.d_ff,
                                  dtype=model.dtype), **kwargs)
  ffn_variables = {col: tree["ffn"] for col, tree in block.items() if "ffn" in tree}
  h_BTD = _rms_norm(model, block["params"]["ffn_norm"], x_BTD)
  y_BTD, _ = ffn.apply(ffn_variables, h_BTD, deterministic=True)
  return x_BTD + y_BTD


def _logits(model: TransformerLM, variables: dict, x_BTD: jax.Array) -> jax.Array:
  """float32 logits of RMSNorm(x) through the tied embedding or the lm_head."""
  params = variables["params"]
  x_BTD = _rms_norm(model, params["final_norm"], x_BTD)
  if model.tie_embeddings:
    embed = nn.Embed(model.vocab_size, model.d_model, dtype=model.dtype)
    logits_BTV = embed.apply({"params": params["embed"]}, x_BTD, method=nn.Embed.attend)
  else:
    logits_BTV = x_BTD @ params["lm_head"].astype(model.dtype)
  return logits_BTV.astype(jnp.float32)
