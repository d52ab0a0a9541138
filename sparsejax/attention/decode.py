"""Decode-time attention over an explicit KV cache, with token selection and cross-layer reuse.

One new query per head attends to the cached keys and values of its layer, either to all of
them ("full") or to a selected subset: the top tokens per head by exact score ("topk"), one
token set shared by all heads ("shared", LessIsMore), or whole pages ranked by an upper bound
kept in the cache ("pages", Quest). A per-layer plan (`selection_plan`) says which layers attend
fully, which choose positions and which reuse the positions chosen below them (TidalDecode,
DELTA). Everything is a pure function on the `KVCache` pytree; shapes are static (the cache
holds `max_len` slots, the first `lengths_L[l]` of layer l filled).

Shape letters beyond the DESIGN legend: L layers, S cache slots (max_len), K the per-head dim,
N selected tokens or pages per head, M pages in the cache, P positions per page.
"""
import jax
import jax.numpy as jnp
from flax import struct

SELECTIONS = ("full", "topk", "shared", "pages")
# Per-layer actions of a plan: "full" attends to every cached token; "select" attends fully and
# chooses positions for the layers above (TidalDecode's token selection layer, DELTA's delta
# layer); "sparse" chooses positions and attends only to them (Quest, LessIsMore in every
# layer); "reuse" attends to the positions chosen by the nearest "select" / "sparse" layer below.
ACTIONS = ("full", "select", "sparse", "reuse")
PLANS = ("full", "every_layer", "tidal", "delta")


@struct.dataclass
class KVCache:
  """Keys and values of every layer, `max_len` slots each, and per-page key summaries.

  k_LBHSK, v_LBHSK: the cached (post-RoPE) keys and values; lengths_L: int32, the filled slots
  of each layer (slots >= length are ignored); with page_size P > 0, kmin_LBHMK / kmax_LBHMK:
  the elementwise min / max of the keys in each page of P slots (0 for an empty page), else
  None.
  """

  k_LBHSK: jax.Array
  v_LBHSK: jax.Array
  lengths_L: jax.Array
  kmin_LBHMK: jax.Array | None = None
  kmax_LBHMK: jax.Array | None = None
  page_size: int = struct.field(pytree_node=False, default=0)

  @property
  def max_len(self) -> int:
    return self.k_LBHSK.shape[3]


def init_cache(num_layers: int, batch: int, num_heads: int, max_len: int, head_dim: int, *,
               page_size: int = 0, dtype=jnp.float32) -> KVCache:
  """An empty cache of `max_len` slots per layer; with page_size > 0 also page summaries."""
  for name, value in (("num_layers", num_layers), ("batch", batch), ("num_heads", num_heads),
                      ("max_len", max_len), ("head_dim", head_dim)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int")
  if not isinstance(page_size, int) or page_size < 0 or (page_size and max_len % page_size):
    raise ValueError(f"page_size={page_size!r} must be 0 (no pages) or a positive divisor of "
                     f"max_len={max_len}")
  shape = (num_layers, batch, num_heads, max_len, head_dim)
  summaries = {}
  if page_size:
    pages_shape = (num_layers, batch, num_heads, max_len // page_size, head_dim)
    summaries = {"kmin_LBHMK": jnp.zeros(pages_shape, dtype),
                 "kmax_LBHMK": jnp.zeros(pages_shape, dtype)}
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((num_layers,), jnp.int32), page_size=page_size, **summaries)


def page_summaries(k_BHSK: jax.Array, length: jax.Array,
                   page_size: int) -> tuple[jax.Array, jax.Array]:
  """(kmin_BHMK, kmax_BHMK): per page of P slots the elementwise min / max of the keys at
  slots < length; 0 for pages without such a slot.
  Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"."""
  batch, heads, slots, head_dim = k_BHSK.shape
  k_BHMPK = k_BHSK.reshape(batch, heads, slots // page_size, page_size, head_dim)
  valid_MP1 = (jnp.arange(slots) < length).reshape(-1, page_size)[..., None]
  kmin_BHMK = jnp.where(valid_MP1, k_BHMPK, jnp.inf).min(axis=-2)
  kmax_BHMK = jnp.where(valid_MP1, k_BHMPK, -jnp.inf).max(axis=-2)
  occupied_M1 = valid_MP1.any(axis=-2)
  return jnp.where(occupied_M1, kmin_BHMK, 0), jnp.where(occupied_M1, kmax_BHMK, 0)


def append(cache: KVCache, layer: int, k_BHK: jax.Array, v_BHK: jax.Array) -> KVCache:
  """Writes one token's keys and values at slot lengths_L[layer] of `layer`, updates that slot's
  page summary, and advances lengths_L[layer] by one (a full cache overwrites its last slot and
  widens the last page's summary, which stays a bound on the keys in it)."""
  pos = cache.lengths_L[layer]
  start = (layer, 0, 0, pos, 0)
  updates = {
      "k_LBHSK": jax.lax.dynamic_update_slice(cache.k_LBHSK, k_BHK[None, :, :, None], start),
      "v_LBHSK": jax.lax.dynamic_update_slice(cache.v_LBHSK, v_BHK[None, :, :, None], start),
      "lengths_L": cache.lengths_L.at[layer].add(1),
  }
  if cache.page_size:
    page_start = (layer, 0, 0, pos // cache.page_size, 0)
    opens_page = (pos % cache.page_size == 0) & (pos < cache.max_len)
    for name, reduce in (("kmin_LBHMK", jnp.minimum), ("kmax_LBHMK", jnp.maximum)):
      summary = getattr(cache, name)
      old_1BH1K = jax.lax.dynamic_slice(summary, page_start, (1, *k_BHK.shape[:2], 1,
                                                              k_BHK.shape[2]))
      new_1BH1K = jnp.where(opens_page, k_BHK[None, :, :, None],
                            reduce(old_1BH1K, k_BHK[None, :, :, None]))
      updates[name] = jax.lax.dynamic_update_slice(summary, new_1BH1K, page_start)
  return cache.replace(**updates)


def extend(cache: KVCache, layer: int, k_BHTK: jax.Array, v_BHTK: jax.Array) -> KVCache:
  """Writes T tokens' keys and values from slot lengths_L[layer] of `layer` on (a prefill),
  advances lengths_L[layer] by T and recomputes that layer's page summaries."""
  start = (layer, 0, 0, cache.lengths_L[layer], 0)
  k_LBHSK = jax.lax.dynamic_update_slice(cache.k_LBHSK, k_BHTK[None], start)
  v_LBHSK = jax.lax.dynamic_update_slice(cache.v_LBHSK, v_BHTK[None], start)
  lengths_L = cache.lengths_L.at[layer].add(k_BHTK.shape[2])
  cache = cache.replace(k_LBHSK=k_LBHSK, v_LBHSK=v_LBHSK, lengths_L=lengths_L)
  if not cache.page_size:
    return cache
  kmin_BHMK, kmax_BHMK = page_summaries(k_LBHSK[layer], lengths_L[layer], cache.page_size)
  return cache.replace(kmin_LBHMK=cache.kmin_LBHMK.at[layer].set(kmin_BHMK),
                       kmax_LBHMK=cache.kmax_LBHMK.at[layer].set(kmax_BHMK))


def selection_plan(num_layers: int, kind: str = "tidal", *, num_full: int = 2,
                   reselect: tuple[int, ...] = (), group_size: int = 4) -> tuple[str, ...]:
  """Per-layer actions (`ACTIONS`) of a decode plan `kind` (`PLANS`).

  "full": every layer attends fully. "every_layer": every layer selects for itself ("sparse";
  Quest, LessIsMore). "tidal": layers < num_full attend fully, layer num_full and the layers in
  `reselect` "select", the others "reuse" (Yang et al. 2024, "TidalDecode: Fast and Accurate LLM
  Decoding with Position Persistent Sparse Attention"). "delta": layers < num_full attend
  fully, then groups of `group_size` layers whose first layer "select"s and the rest "reuse"
  (Zarch et al. 2025, "DELTA: Dynamic Layer-Aware Token Attention for Efficient Long-Context
  Reasoning").
  """
  if kind not in PLANS:
    raise ValueError(f"plan kind={kind!r}; allowed: {', '.join(PLANS)}")
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers={num_layers!r} must be a positive int")
  if kind == "full":
    return ("full",) * num_layers
  if kind == "every_layer":
    return ("sparse",) * num_layers
  if not 0 <= num_full < num_layers:
    raise ValueError(f"num_full={num_full} must be in [0, {num_layers - 1}] so that a layer "
                     f"is left to select")
  if kind == "tidal":
    outside = [layer for layer in reselect if not num_full < layer < num_layers]
    if outside:
      raise ValueError(f"reselect layers {outside} must lie in [{num_full + 1}, "
                       f"{num_layers - 1}]")
    chosen = {num_full, *reselect}
    return tuple("full" if layer < num_full else "select" if layer in chosen else "reuse"
                 for layer in range(num_layers))
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be >= 1")
  return tuple("full" if layer < num_full else
               "select" if (layer - num_full) % group_size == 0 else "reuse"
               for layer in range(num_layers))


def check_plan(plan: tuple[str, ...], num_layers: int) -> None:
  """One-line ValueErrors unless `plan` holds one action per layer and every "reuse" layer has a
  "select" or "sparse" layer below it."""
  if len(plan) != num_layers:
    raise ValueError(f"plan {plan} must hold one action per layer ({num_layers})")
  unknown = sorted(set(plan) - set(ACTIONS))
  if unknown:
    raise ValueError(f"plan actions {unknown}; allowed: {', '.join(ACTIONS)}")
  chosen = False
  for layer, action in enumerate(plan):
    if action == "reuse" and not chosen:
      raise ValueError(f"plan layer {layer} reuses positions but no layer below it chooses any")
    chosen = chosen or action in ("select", "sparse")


def check_selection(cache: KVCache, selection: str, budget: int | None, sink: int = 0,
                    recent: int = 0) -> None:
  """One-line ValueErrors for a selection policy and budget this cache cannot serve."""
  if selection not in SELECTIONS:
    raise ValueError(f"selection={selection!r}; allowed: {', '.join(SELECTIONS)}")
  if selection == "full":
    return
  if not isinstance(budget, int) or budget < 1:
    raise ValueError(f"budget={budget!r} must be a positive int for selection={selection!r}")
  if sink < 0 or recent < 0 or sink + recent > budget:
    raise ValueError(f"sink={sink} and recent={recent} must be >= 0 with sink + recent <= "
                     f"budget={budget}")
  if selection == "pages":
    if not cache.page_size:
      raise ValueError("selection='pages' needs a cache with page summaries (page_size > 0)")
    page = cache.page_size
    if budget % page:
      raise ValueError(f"budget={budget} must be a multiple of the cache's "
                       f"page_size={page} for selection='pages'")
    if -(-sink // page) - (-recent // page) > budget // page:
      raise ValueError(f"sink={sink} and recent={recent} fill more than the budget's "
                       f"{budget // page} pages of {page}")


def select(q_BHK: jax.Array, cache: KVCache, layer: int, selection: str, budget: int, *,
           sink: int = 0, recent: int = 0) -> jax.Array:
  """idx_BHN, ascending: the cache positions ("topk", "shared", N = budget) or pages ("pages",
  N = budget / P) that `q` attends to in `layer`.

  With s_hj = q_h . k_hj / sqrt(K) over filled slots j < n:
  "topk": per head the `budget` largest s_hj.
  "shared": the `budget` largest a_j = sum_h softmax_j(s_h)_j, one set for all heads
  (LessIsMore: Yang et al. 2025, "Less is More: Training-Free Sparse Attention with Global
  Locality for Efficient Reasoning").
  "pages": per head the budget / P pages of largest u_hm = sum_d max(q_hd min_hmd, q_hd max_hmd)
  >= max_{j in page m} q_h . k_hj (Tang et al. 2024, "Quest").
  The first `sink` and the last `recent` filled positions are always kept, within the budget
  ("pages": the first ceil(sink / P) pages and the newest ceil(recent / P) pages, the current,
  possibly partly filled page among them, so that fewer than the last `recent` positions may be
  kept). When fewer than N positions are filled, the rest are unfilled slots, which `attend`
  masks.
  """
  check_selection(cache, selection, budget, sink, recent)
  length = cache.lengths_L[layer]
  if selection == "pages":
    page = cache.page_size
    start_M = jnp.arange(cache.max_len // page) * page
    kmin_BHMK, kmax_BHMK = cache.kmin_LBHMK[layer], cache.kmax_LBHMK[layer]
    q_BH1K = q_BHK[:, :, None].astype(kmin_BHMK.dtype)
    key_BHM = jnp.maximum(q_BH1K * kmin_BHMK, q_BH1K * kmax_BHMK).sum(-1)
    newest_M = jnp.arange(start_M.size) > (length - 1) // page - -(-recent // page)
    forced_M = (start_M < sink) | newest_M
    return _top_positions(key_BHM, start_M < length, forced_M, budget // page)
  pos_S = jnp.arange(cache.max_len)
  valid_S = pos_S < length
  s_BHS = _scores(q_BHK, cache.k_LBHSK[layer])
  forced_S = (pos_S < sink) | (pos_S >= length - recent)
  if selection == "topk":
    return _top_positions(s_BHS, valid_S, forced_S, budget)
  probs_BHS = jax.nn.softmax(jnp.where(valid_S, s_BHS, -jnp.inf), axis=-1)
  idx_BN = _top_positions(probs_BHS.sum(axis=1), valid_S, forced_S, budget)
  return jnp.broadcast_to(idx_BN[:, None], (*q_BHK.shape[:2], budget))


def attend(q_BHK: jax.Array, cache: KVCache, layer: int, selection: str = "full",
           budget: int | None = None, reuse_idx: jax.Array | None = None, *, sink: int = 0,
           recent: int = 0) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """(o_BHK, idx_BHN or None, attended): one query per head attending to `layer`'s cache.

  o_h = sum_{j in J_h} softmax_j(q_h . k_hj / sqrt(K)) v_hj over the filled positions J_h that
  `selection` picks (`select`), or over `reuse_idx` when given (positions, or pages for
  "pages", chosen by another layer). "full", or a budget >= the cache's max_len, attends to
  every filled slot with the same ops as "full", so the result equals full attention exactly;
  idx is then None. attended: the mean over batch and heads of |J_h| / n, n the filled length.
  """
  check_selection(cache, selection, budget, sink, recent)
  length = cache.lengths_L[layer]
  k_BHSK, v_BHSK = cache.k_LBHSK[layer], cache.v_LBHSK[layer]
  if selection == "full" or budget >= cache.max_len:
    o_BHK = _softmax_attend(q_BHK, k_BHSK, v_BHSK, jnp.arange(cache.max_len) < length)
    return o_BHK, None, jnp.ones((), jnp.float32)
  idx_BHN = reuse_idx if reuse_idx is not None else select(
      q_BHK, cache, layer, selection, budget, sink=sink, recent=recent)
  if selection == "pages":
    page = cache.page_size
    pos_BHN = (idx_BHN[..., None] * page + jnp.arange(page)).reshape(*idx_BHN.shape[:2], -1)
    k_sel_BHNK, v_sel_BHNK = (_gather_rows(x_BHSK, idx_BHN, page) for x_BHSK in (k_BHSK, v_BHSK))
  else:
    pos_BHN = idx_BHN
    k_sel_BHNK, v_sel_BHNK = (_gather_rows(x_BHSK, idx_BHN, 1) for x_BHSK in (k_BHSK, v_BHSK))
  valid_BHN = pos_BHN < length
  o_BHK = _softmax_attend(q_BHK, k_sel_BHNK, v_sel_BHNK, valid_BHN)
  attended = jnp.mean(valid_BHN.sum(-1) / length).astype(jnp.float32)
  return o_BHK, idx_BHN, attended


def _scores(q_BHK: jax.Array, k_BHSK: jax.Array) -> jax.Array:
  """s_BHS = q . k / sqrt(K)."""
  scale = jnp.asarray(q_BHK.shape[-1] ** -0.5, q_BHK.dtype)
  return jnp.einsum("bhk,bhsk->bhs", q_BHK, k_BHSK) * scale


def _softmax_attend(q_BHK: jax.Array, k_BHSK: jax.Array, v_BHSK: jax.Array,
                    valid: jax.Array) -> jax.Array:
  """sum_s softmax_s(s_BHS masked to `valid`) v_BHSK, in float32, returned in q's dtype."""
  s_BHS = jnp.where(valid, _scores(q_BHK, k_BHSK).astype(jnp.float32), -jnp.inf)
  p_BHS = jax.nn.softmax(s_BHS, axis=-1)
  return jnp.einsum("bhs,bhsk->bhk", p_BHS, v_BHSK.astype(jnp.float32)).astype(q_BHK.dtype)


def _top_positions(key_BHX: jax.Array, valid_X: jax.Array, forced_X: jax.Array,
                   count: int) -> jax.Array:
  """The `count` valid positions of largest key along the last axis, forced positions ranked
  above all others, returned in ascending order; fewer valid positions than `count` are padded
  with invalid ones (which `attend` masks)."""
  key_BHX = jnp.where(forced_X, jnp.inf, key_BHX.astype(jnp.float32))
  _, idx_BHN = jax.lax.top_k(jnp.where(valid_X, key_BHX, -jnp.inf), count)
  return jnp.sort(idx_BHN.astype(jnp.int32), axis=-1)


def _gather_rows(x_BHSK: jax.Array, idx_BHN: jax.Array, rows: int) -> jax.Array:
  """[B, H, N rows, K]: the `rows` consecutive slots from rows * idx on of each head's x."""
  batch, heads, slots, head_dim = x_BHSK.shape
  table = x_BHSK.reshape(batch * heads * (slots // rows), rows * head_dim)
  base_BH1 = (jnp.arange(batch * heads, dtype=jnp.int32) * (slots // rows)).reshape(
      batch, heads, 1)
  picked = jnp.take(table, idx_BHN + base_BH1, axis=0, mode="clip")
  return picked.reshape(batch, heads, -1, head_dim)
