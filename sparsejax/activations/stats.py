"""Neuron statistics: firing rates, dead / always-on / lazy neurons, n-gram and positional scores,
top-activating contexts, accumulated batch by batch in an explicit state pytree.

A neuron (one of the F units at a site, e.g. "layer_1/ffn/hidden") fires on a token when its
activation a > eps and is near zero when |a| <= eps. `update_neuron_stats` adds one batch of
activations a_TF to a `NeuronStats` (counts, moments, max, per-position firing counts, per-token
and per-bigram activation sums, a running top-k of contexts); `merge_neuron_stats` adds two
states; `summarize` turns a state into rates and scores. `collect_neuron_stats` runs any model
marking `sparsejax.sites` over batches and returns one state per matching site.

Li et al. 2023, "The Lazy Neuron Phenomenon: On Emergence of Activation Sparsity in
Transformers" (the fraction of zero activations); Voita et al. 2023, "Neurons in Large Language
Models: Dead, N-gram, Positional".
"""
import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import sites as sites_lib

EPS = 1e-2  # default firing / near-zero threshold on |a|
_HASH = 2654435761  # Knuth's multiplicative hash constant, for bigram buckets


@flax.struct.dataclass
class NeuronStats:
  """Sums over the (weighted) tokens seen so far, for F neurons.

  tokens: N = sum of token weights. fired_F / near_zero_F: sum w [a > eps] / sum w [|a| <= eps].
  sum_F, sum_sq_F: sum w a, sum w a^2. max_F: max a over tokens of weight > 0 (-inf before any).
  position_tokens_P, position_fired_PF: N and fired_F per position bucket (P = 0: not kept).
  token_count_V, token_sum_VF: N and sum_F per current token id (V = 0: not kept).
  bigram_count_G, bigram_sum_GF: the same per (previous, current) token bucket (G = 0: not kept).
  top_acts_FK, top_contexts_FK2: each neuron's K largest activations, largest first, and their
  (window, position) contexts; -inf and (-1, -1) where fewer than K tokens were seen.
  """
  tokens: jax.Array
  fired_F: jax.Array
  near_zero_F: jax.Array
  sum_F: jax.Array
  sum_sq_F: jax.Array
  max_F: jax.Array
  position_tokens_P: jax.Array
  position_fired_PF: jax.Array
  token_count_V: jax.Array
  token_sum_VF: jax.Array
  bigram_count_G: jax.Array
  bigram_sum_GF: jax.Array
  top_acts_FK: jax.Array
  top_contexts_FK2: jax.Array

  @property
  def num_neurons(self) -> int:
    return self.fired_F.shape[0]


def init_neuron_stats(num_neurons: int, *, num_positions: int = 0, vocab_size: int = 0,
                      bigram_buckets: int = 0, top_k: int = 0) -> NeuronStats:
  """The empty state for `num_neurons` neurons; each optional statistic is kept when its size > 0.

  num_positions: P position buckets (positional scores); vocab_size: V token ids (token scores);
  bigram_buckets: G (previous, current) token buckets, exact when G >= (V + 1) V, else hashed
  (bigram scores; needs V > 0); top_k: K top-activating contexts per neuron.
  """
  sizes = {"num_neurons": num_neurons, "num_positions": num_positions, "vocab_size": vocab_size,
           "bigram_buckets": bigram_buckets, "top_k": top_k}
  for name, value in sizes.items():
    if not isinstance(value, int) or value < (1 if name == "num_neurons" else 0):
      raise ValueError(f"{name}={value!r}; allowed: an int >= {1 if name == 'num_neurons' else 0}")
  if bigram_buckets and not vocab_size:
    raise ValueError(f"bigram_buckets={bigram_buckets} needs vocab_size > 0, got {vocab_size}")
  f, zeros = num_neurons, lambda *shape: jnp.zeros(shape, jnp.float32)
  return NeuronStats(
      tokens=zeros(), fired_F=zeros(f), near_zero_F=zeros(f), sum_F=zeros(f), sum_sq_F=zeros(f),
      max_F=jnp.full((f,), -jnp.inf, jnp.float32), position_tokens_P=zeros(num_positions),
      position_fired_PF=zeros(num_positions, f), token_count_V=zeros(vocab_size),
      token_sum_VF=zeros(vocab_size, f), bigram_count_G=zeros(bigram_buckets),
      bigram_sum_GF=zeros(bigram_buckets, f),
      top_acts_FK=jnp.full((f, top_k), -jnp.inf, jnp.float32),
      top_contexts_FK2=jnp.full((f, top_k, 2), -1, jnp.int32))


@jax.jit
def update_neuron_stats(
    state: NeuronStats,
    acts_TF: jax.Array,
    weights_T: jax.Array | None = None,
    *,
    positions_T: jax.Array | None = None,
    token_ids_T: jax.Array | None = None,
    prev_token_ids_T: jax.Array | None = None,
    contexts_T2: jax.Array | None = None,
    eps: float = EPS,
) -> NeuronStats:
  """`state` plus the T tokens of `acts_TF`, each weighted by weights_T (1 when None, 0 = padding).

  fired_F += sum_t w_t [a_tf > eps], near_zero_F += sum_t w_t [|a_tf| <= eps], sum_F += sum_t
  w_t a_tf, ..., max_F = max(max_F, max_{t: w_t > 0} a_tf). The kept optional statistics need
  their inputs: positions_T (bucket ids in [0, P)), token_ids_T (in [0, V)), prev_token_ids_T
  (the previous token, -1 where there is none: its own context), contexts_T2 ((window,
  position) ids stored with the top-k). Jitted; which statistics are kept is static (shapes).
  """
  if acts_TF.ndim != 2 or acts_TF.shape[1] != state.num_neurons:
    raise ValueError(f"acts_TF has shape {acts_TF.shape}; allowed: [T, {state.num_neurons}]")
  acts_TF = acts_TF.astype(jnp.float32)
  num_tokens = acts_TF.shape[0]
  w_T = jnp.ones(num_tokens) if weights_T is None else jnp.asarray(weights_T, jnp.float32)
  w_T1 = w_T[:, None]
  fired_TF = (acts_TF > eps) * w_T1
  seen_TF = jnp.where(w_T1 > 0, acts_TF, -jnp.inf)
  updates = {
      "tokens": state.tokens + jnp.sum(w_T),
      "fired_F": state.fired_F + jnp.sum(fired_TF, 0),
      "near_zero_F": state.near_zero_F + jnp.sum((jnp.abs(acts_TF) <= eps) * w_T1, 0),
      "sum_F": state.sum_F + jnp.sum(acts_TF * w_T1, 0),
      "sum_sq_F": state.sum_sq_F + jnp.sum(acts_TF**2 * w_T1, 0),
      "max_F": jnp.maximum(state.max_F, jnp.max(seen_TF, 0)),
  }
  num_positions, vocab_size = state.position_tokens_P.shape[0], state.token_count_V.shape[0]
  if num_positions:
    positions_T = _required("positions_T", positions_T, num_tokens)
    add = lambda total, x: total + jax.ops.segment_sum(x, positions_T, num_positions)
    updates["position_tokens_P"] = add(state.position_tokens_P, w_T)
    updates["position_fired_PF"] = add(state.position_fired_PF, fired_TF)
  if vocab_size:
    token_ids_T = _required("token_ids_T", token_ids_T, num_tokens)
    add = lambda total, x: total + jax.ops.segment_sum(x, token_ids_T, vocab_size)
    updates["token_count_V"] = add(state.token_count_V, w_T)
    updates["token_sum_VF"] = add(state.token_sum_VF, acts_TF * w_T1)
  if state.bigram_count_G.shape[0]:
    prev_token_ids_T = _required("prev_token_ids_T", prev_token_ids_T, num_tokens)
    buckets_T = bigram_buckets(prev_token_ids_T, token_ids_T, vocab_size,
                               state.bigram_count_G.shape[0])
    add = lambda total, x: total + jax.ops.segment_sum(x, buckets_T, total.shape[0])
    updates["bigram_count_G"] = add(state.bigram_count_G, w_T)
    updates["bigram_sum_GF"] = add(state.bigram_sum_GF, acts_TF * w_T1)
  if state.top_acts_FK.shape[1]:
    contexts_T2 = _required("contexts_T2", contexts_T2, num_tokens)
    updates["top_acts_FK"], updates["top_contexts_FK2"] = _merge_top_k(
        state.top_acts_FK, state.top_contexts_FK2, seen_TF.T,
        jnp.broadcast_to(contexts_T2.astype(jnp.int32), (state.num_neurons, num_tokens, 2)))
  return state.replace(**updates)


@jax.jit
def merge_neuron_stats(a: NeuronStats, b: NeuronStats) -> NeuronStats:
  """The state of the tokens of `a` and of `b` together: sums added, maxima and top-k merged."""
  if [x.shape for x in jax.tree.leaves(a)] != [x.shape for x in jax.tree.leaves(b)]:
    raise ValueError("merge_neuron_stats needs two states of the same sizes (init arguments)")
  merged = jax.tree.map(jnp.add, a, b)
  top_acts_FK, top_contexts_FK2 = _merge_top_k(a.top_acts_FK, a.top_contexts_FK2, b.top_acts_FK,
                                               b.top_contexts_FK2)
  return merged.replace(max_F=jnp.maximum(a.max_F, b.max_F), top_acts_FK=top_acts_FK,
                        top_contexts_FK2=top_contexts_FK2)


def bigram_buckets(prev_token_ids_T: jax.Array, token_ids_T: jax.Array, vocab_size: int,
                   num_buckets: int) -> jax.Array:
  """Bucket of each (previous, current) token pair: pair = (prev + 1) V + cur (prev = -1: none),
  the pair itself when num_buckets >= (V + 1) V, else (pair * 2654435761 mod 2^32) mod G."""
  pair_T = ((prev_token_ids_T + 1) * vocab_size + token_ids_T).astype(jnp.uint32)
  if num_buckets >= (vocab_size + 1) * vocab_size:
    return pair_T.astype(jnp.int32)
  return ((pair_T * jnp.uint32(_HASH)) % jnp.uint32(num_buckets)).astype(jnp.int32)


@jax.jit
def summarize(state: NeuronStats) -> dict[str, jax.Array]:
  """Rates and scores of `state`; with N tokens, r_f = fired_f / N:

  firing_rate_F = r, near_zero_rate_F, firing_fraction = mean_f r_f (the fraction of neurons
  firing on a token), near_zero_fraction = mean_f near_zero_f / N (Li et al.'s lazy-neuron
  measurement), dead_F = [fired_f = 0] and dead (their count), always_on_F = [fired_f = N] and
  always_on, mean_F, std_F (population), max_F. Kept statistics add position_rate_PF and
  positional_score_F = I(fire; position bucket) in bits; token_score_F / bigram_score_F = the
  adjusted fraction of activation variance explained by the means per token / bigram bucket,
  1 - (1 - SS_between / SS_total) (N - 1) / (N - G_seen), clipped to [0, 1] (0 for constant
  neurons); top_acts_FK and top_contexts_FK2.
  """
  n = jnp.maximum(state.tokens, 1.0)
  mean_F = state.sum_F / n
  rate_F = state.fired_F / n
  out = {
      "tokens": state.tokens, "firing_rate_F": rate_F,
      "near_zero_rate_F": state.near_zero_F / n, "firing_fraction": jnp.mean(rate_F),
      "near_zero_fraction": jnp.mean(state.near_zero_F / n), "dead_F": state.fired_F == 0,
      "always_on_F": (state.fired_F == state.tokens) & (state.tokens > 0), "mean_F": mean_F,
      "std_F": jnp.sqrt(jnp.maximum(state.sum_sq_F / n - mean_F**2, 0.0)), "max_F": state.max_F,
  }
  out["dead"], out["always_on"] = jnp.sum(out["dead_F"]), jnp.sum(out["always_on_F"])
  if state.position_tokens_P.shape[0]:
    n_P1 = jnp.maximum(state.position_tokens_P, 1.0)[:, None]
    out["position_rate_PF"] = state.position_fired_PF / n_P1
    p_P1 = state.position_tokens_P[:, None] / n
    out["positional_score_F"] = jnp.maximum(
        _binary_entropy(rate_F) - jnp.sum(p_P1 * _binary_entropy(out["position_rate_PF"]), 0), 0.0)
  if state.token_count_V.shape[0]:
    out["token_score_F"] = _explained_variance(state, state.token_count_V, state.token_sum_VF)
  if state.bigram_count_G.shape[0]:
    out["bigram_score_F"] = _explained_variance(state, state.bigram_count_G, state.bigram_sum_GF)
  if state.top_acts_FK.shape[1]:
    out["top_acts_FK"], out["top_contexts_FK2"] = state.top_acts_FK, state.top_contexts_FK2
  return out


def json_summary(state: NeuronStats, top: int = 8) -> dict[str, Any]:
  """A JSON-ready per-site summary: scalars of `summarize` and, per kept score, the `top`
  neurons as [neuron, score] pairs (keys top_positional / top_token / top_bigram)."""
  s = jax.device_get(summarize(state))
  out = {"num_neurons": state.num_neurons, "tokens": float(s["tokens"]),
         "firing_fraction": float(s["firing_fraction"]),
         "near_zero_fraction": float(s["near_zero_fraction"]), "dead": int(s["dead"]),
         "always_on": int(s["always_on"])}
  for score in ("positional", "token", "bigram"):
    if f"{score}_score_F" in s:
      scores_F = np.asarray(s[f"{score}_score_F"])
      order = np.argsort(-scores_F, kind="stable")[:top]
      out[f"top_{score}"] = [[int(f), float(scores_F[f])] for f in order]
  return out


def collect_neuron_stats(
    model: Any,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    sites: str | Sequence[str] = "layer_*/ffn/hidden",
    *,
    eps: float = EPS,
    num_position_buckets: int = 0,
    vocab_size: int = 0,
    bigram_buckets: int = 0,
    top_k: int = 0,
    **apply_kwargs: Any,
) -> dict[str, NeuronStats]:
  """{site path: NeuronStats} of `model` over `batches`, read with `sparsejax.sites.collect`.

  Each batch is {"inputs": the model's input [B, T, ...] (token ids [B, T] when vocab_size > 0),
  optionally "weights" [B, T] (0 = padding) and "window_ids" [B] (the top-k contexts' window;
  default: the running count of windows)}. A site's value [B, T, ...] gives B T tokens of
  prod(...) neurons ([B, F]: one token per example). Position bucket of t: t P // T. The
  update runs jitted, one compile per batch shape. `apply_kwargs` go to `model.apply`.
  """
  sizes = {"num_positions": num_position_buckets, "vocab_size": vocab_size,
           "bigram_buckets": bigram_buckets, "top_k": top_k}
  step, states, seen = None, None, 0
  for batch in batches:
    inputs = jnp.asarray(batch["inputs"])
    if states is None:
      shapes = jax.eval_shape(lambda x: sites_lib.collect(
          model, variables, x, sites=sites, **apply_kwargs)[1], inputs)
      states = {path: init_neuron_stats(_site_width(path, shape), **sizes)
                for path, shape in shapes.items()}
      step = jax.jit(lambda states, variables, batch: _collect_step(
          model, variables, sites, states, batch, eps, apply_kwargs), donate_argnums=0)
    num_windows = inputs.shape[0]
    window_ids = batch.get("window_ids", np.arange(seen, seen + num_windows))
    states = step(states, variables, {"inputs": inputs, "weights": batch.get("weights"),
                                      "window_ids": jnp.asarray(window_ids, jnp.int32)})
    seen += num_windows
  if states is None:
    raise ValueError("batches is empty; collect_neuron_stats needs at least one batch")
  return states


def save_stats(path: str, stats: Mapping[str, NeuronStats],
               extra: Mapping[str, Mapping[str, Any]] | None = None, top: int = 8
               ) -> dict[str, Any]:
  """Writes `path`.npz (every state array, keyed "site:field") and `path`.json ({site:
  json_summary(state, top) updated by extra[site]}); returns that JSON summary."""
  arrays = {f"{site}:{name}": np.asarray(value) for site, state in stats.items()
            for name, value in _fields(state).items()}
  np.savez(path + ".npz", **arrays)
  summary = {site: {**json_summary(state, top), **(extra or {}).get(site, {})}
             for site, state in stats.items()}
  with open(path + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def load_stats(path: str) -> dict[str, NeuronStats]:
  """The {site: NeuronStats} that `save_stats(path, ...)` wrote to `path`.npz."""
  fields: dict[str, dict[str, jax.Array]] = {}
  with np.load(path + ".npz") as data:
    for key in data.files:
      site, name = key.rsplit(":", 1)
      fields.setdefault(site, {})[name] = jnp.asarray(data[key])
  return {site: NeuronStats(**values) for site, values in fields.items()}


def _collect_step(model, variables, sites, states, batch, eps, apply_kwargs):
  """The states plus one batch's site values (see `collect_neuron_stats`)."""
  inputs = batch["inputs"]
  _, captured = sites_lib.collect(model, variables, inputs, sites=sites, **apply_kwargs)
  out = {}
  for path, state in states.items():
    value = captured[path]
    num_windows, seq_len = value.shape[0], (value.shape[1] if value.ndim > 2 else 1)
    acts_TF = value.reshape(num_windows * seq_len, state.num_neurons)
    positions_BT = jnp.broadcast_to(jnp.arange(seq_len), (num_windows, seq_len))
    weights = batch["weights"]
    token_inputs = {}
    if state.token_count_V.shape[0]:
      if inputs.shape != (num_windows, seq_len) or not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"vocab_size > 0 needs token ids [B, T] = [{num_windows}, {seq_len}] "
                         f"as inputs, got {inputs.dtype} {inputs.shape}")
      prev_BT = jnp.pad(inputs[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
      token_inputs = {"token_ids_T": inputs.reshape(-1), "prev_token_ids_T": prev_BT.reshape(-1)}
    contexts_BT2 = jnp.stack(
        [jnp.broadcast_to(batch["window_ids"][:, None], positions_BT.shape), positions_BT], -1)
    num_buckets = state.position_tokens_P.shape[0]
    out[path] = update_neuron_stats(
        state, acts_TF, None if weights is None else jnp.reshape(weights, -1),
        positions_T=(positions_BT * num_buckets // seq_len).reshape(-1),
        contexts_T2=contexts_BT2.reshape(-1, 2), eps=eps, **token_inputs)
  return out


def _fields(state: NeuronStats) -> dict[str, jax.Array]:
  return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


def _site_width(path: str, shape: Any) -> int:
  if not hasattr(shape, "shape") or len(shape.shape) < 2:
    raise ValueError(f"site {path!r} holds {shape}; neuron statistics need one array [B, T, ...] "
                     f"or [B, F] per site (a site called once)")
  return math.prod(shape.shape[2:]) if len(shape.shape) > 2 else shape.shape[1]


def _required(name: str, value: jax.Array | None, num_tokens: int) -> jax.Array:
  if value is None or value.shape[0] != num_tokens:
    raise ValueError(f"{name} is {None if value is None else value.shape}; the state keeps the "
                     f"statistic it feeds, so give it for all {num_tokens} tokens")
  return value


def _merge_top_k(acts_FK, contexts_FK2, new_acts_FN, new_contexts_FN2):
  """The K largest of each row of [acts_FK, new_acts_FN] and their contexts (ties: earlier)."""
  k = acts_FK.shape[1]
  top_FK, idx_FK = jax.lax.top_k(jnp.concatenate([acts_FK, new_acts_FN], 1), k)
  contexts = jnp.concatenate([contexts_FK2, new_contexts_FN2], 1)
  picked_FK2 = jnp.take_along_axis(contexts, idx_FK[..., None], axis=1)
  return top_FK, jnp.where(jnp.isfinite(top_FK)[..., None], picked_FK2, -1)


def _binary_entropy(p: jax.Array) -> jax.Array:
  """H(p) in bits, with 0 log 0 = 0."""
  plogp = lambda q: jnp.where(q > 0, q * jnp.log2(jnp.where(q > 0, q, 1.0)), 0.0)
  return -plogp(p) - plogp(1.0 - p)


def _explained_variance(state: NeuronStats, count_G: jax.Array, sum_GF: jax.Array) -> jax.Array:
  """Adjusted eta^2 of the activations grouped by bucket; see `summarize`."""
  n = state.tokens
  total_F = state.sum_sq_F - state.sum_F**2 / jnp.maximum(n, 1.0)
  between_F = (jnp.sum(sum_GF**2 / jnp.maximum(count_G, 1.0)[:, None], 0)
               - state.sum_F**2 / jnp.maximum(n, 1.0))
  groups = jnp.sum(count_G > 0)
  eta_sq_F = jnp.where(total_F > 1e-6 * state.sum_sq_F,
                       between_F / jnp.where(total_F > 0, total_F, 1.0), 0.0)
  adjusted_F = 1.0 - (1.0 - eta_sq_F) * (n - 1.0) / jnp.maximum(n - groups, 1.0)
  return jnp.where(eta_sq_F > 0, jnp.clip(adjusted_F, 0.0, 1.0), 0.0)
