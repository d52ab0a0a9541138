"""Mask structures: which entries of one kernel may be kept together, and how many exactly.

Kernel axis convention (see `sparsejax.masks.mask`): the last axis O is the output axis, the one
before it I the input axis, leading axes L are independent batches. Shape letters beyond the
DESIGN legend: I inputs, O outputs, L leading batch axes, R / C block rows / columns, M group.

Score-based structures keep the highest scores subject to the structure (`select`); ties are
broken deterministically, the lower flat index first. With `k = round(density n)` (Python /
NumPy round-half-to-even):

  unstructured  exactly round(density size) entries per leaf.
  block         block=(bk, bn): the score of a block is the sum of its scores; exactly
                round(density R C) whole blocks per leaf (R = I / bk, C = O / bn).
  nm            n, m: along the input axis every group of m consecutive inputs of an output holds
                exactly n kept entries (density n / m). Mishra et al. 2021, "Accelerating
                Sparse Deep Neural Networks" (2:4).
  fan_in        exactly round(density I) kept inputs per output neuron (and leading index).
                Lasby et al. 2023, "Dynamic Sparse Training with Structured Sparsity" (SRigL).
  channel       whole channels along `axis` (default -1, output channels / conv filters): the
                score of a channel is the sum of its scores; round(density C) channels kept.
  dense         everything kept.

Fixed patterns (`pattern`; `select` on them returns the pattern, scores are ignored):

  butterfly     flat block butterfly on the `block` grid: block (r, c) kept iff r ^ c is 0 or a
                power of two below 2^levels (rectangular grids are stretched from the square
                min(R, C) grid). Density (1 + levels) / n. Dao et al. 2022, "Pixelated
                Butterfly" (the low-rank term is a separate dense factor, not a mask:
                `sparsejax.masks.pixelfly.PixelflyLinear`).
  monarch       block-diagonal with `nblocks` blocks plus its stride permutation
                (i mod nblocks == j mod nblocks): the union of the supports of the two
                block-diagonal Monarch factors. Dao et al. 2022, "Monarch".

A structure is named by its registry key, with its keyword arguments encoded in the name so that
`Mask.structures` carries everything needed to re-select: "nm:n=2,m=4", "block:block=16x16",
"channel:axis=-1" (`structure_name`, `parse_structure`). Every function here accepts either form.
"""
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.registry import STRUCTURES


class Structure(NamedTuple):
  """A registered structure: `count(shape, density, **kw) -> int` and either
  `select(scores, k, **kw) -> bool` keeping k units of a pool of `pool(shape, **kw)` units
  (k = round(density pool); score-based) or `pattern(shape, density, **kw) -> bool` (fixed)."""
  count: Callable[..., int]
  select: Callable[..., jax.Array] | None = None
  pattern: Callable[..., np.ndarray] | None = None
  check: Callable[..., None] | None = None
  pool: Callable[..., int] | None = None


# ------------------------------------------------------------------------------ names and kw


def structure_name(name: str, **kw) -> str:
  """`name` with its keyword arguments encoded: structure_name("nm", n=2, m=4) == "nm:n=2,m=4"."""
  STRUCTURES.get(name)
  if not kw:
    return name
  parts = []
  for key in sorted(kw):
    value = kw[key]
    if isinstance(value, (tuple, list)):
      value = "x".join(str(int(v)) for v in value)
    parts.append(f"{key}={value}")
  return f"{name}:{','.join(parts)}"


def parse_structure(spec: Any) -> tuple[str, dict[str, Any]]:
  """(name, kw) from "nm:n=2,m=4", {"structure": "nm", "n": 2, "m": 4} or "dense"."""
  if isinstance(spec, dict):
    spec = dict(spec)
    if "structure" not in spec:
      raise ValueError(f"a structure spec dict needs a 'structure' key, got {spec}")
    name = spec.pop("structure")
    spec.pop("density", None)
    STRUCTURES.get(name)
    return name, spec
  if not isinstance(spec, str):
    raise ValueError(f"a structure must be a name or a dict, got {spec!r}")
  name, _, args = spec.partition(":")
  STRUCTURES.get(name)
  kw = {}
  for part in filter(None, args.split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      raise ValueError(f"bad structure argument {part!r} in {spec!r}; expected key=value")
    kw[key] = _parse_value(value)
  return name, kw


def _parse_value(value: str) -> Any:
  if "x" in value:
    return tuple(int(v) for v in value.split("x"))
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def _resolve(spec: Any, kw: dict[str, Any]) -> tuple[str, Structure, dict[str, Any]]:
  name, encoded = parse_structure(spec)
  return name, STRUCTURES.get(name), {**encoded, **kw}


# --------------------------------------------------------------------------------- public API


def select(name: Any, scores: jax.Array, density: Any = None, **kw) -> jax.Array:
  """Bool mask of `scores`' shape keeping the highest scores subject to structure `name`.

  `density` may be a Python float (checked to lie in (0, 1]) or a traced scalar (jit-safe: the
  kept count is round(density n) computed on device, kept entries are those of rank < count).
  """
  name, structure, kw = _resolve(name, kw)
  shape = tuple(np.shape(scores))
  _check_density(name, density, allow_none=name in ("nm", "dense") or structure.pattern is not None)
  if structure.check is not None:
    structure.check(shape, density, **kw)
  if structure.select is None:
    if isinstance(density, jax.core.Tracer):
      raise ValueError(f"fixed pattern {name!r} is built on the host from a concrete density; "
                       f"got a traced density (pass the Python float, or None)")
    return jnp.asarray(structure.pattern(shape, density, **kw))
  pool = None if structure.pool is None else structure.pool(shape, **kw)
  k = 0 if pool is None or density is None else _count(density, pool)
  return _jitted_select(name, _freeze(kw))(jnp.asarray(scores, jnp.float32), k)


def _freeze(kw: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  return tuple(sorted((key, tuple(v) if isinstance(v, list) else v) for key, v in kw.items()))


@functools.lru_cache(maxsize=None)
def _jitted_select(name: str, frozen_kw: tuple[tuple[str, Any], ...]) -> Callable:
  """jit(structure.select) with its kw bound: one compilation per scores shape, whatever k."""
  select_fn = STRUCTURES.get(name).select

  def run(scores, k):
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    return select_fn(scores, k, **dict(frozen_kw))

  return jax.jit(run)


def structure_count(name: Any, shape: tuple[int, ...], density: Any = None, **kw) -> int:
  """The exact number of entries `select` / `pattern` keeps for a leaf of `shape`."""
  name, structure, kw = _resolve(name, kw)
  shape = tuple(shape)
  _check_density(name, density, allow_none=name in ("nm", "dense") or structure.pattern is not None)
  if structure.check is not None:
    structure.check(shape, density, **kw)
  return int(structure.count(shape, density, **kw))


def pattern(name: Any, shape: tuple[int, ...], density: Any = None, **kw) -> np.ndarray:
  """The fixed bool pattern of structure `name` for a leaf of `shape` (leading axes repeated)."""
  name, structure, kw = _resolve(name, kw)
  if structure.pattern is None:
    fixed = [n for n in STRUCTURES if STRUCTURES.get(n).pattern is not None]
    raise ValueError(f"structure {name!r} is score-based, not a fixed pattern; fixed patterns: "
                     f"{', '.join(fixed)}")
  _check_density(name, density, allow_none=True)
  structure.check(tuple(shape), density, **kw)
  return structure.pattern(tuple(shape), density, **kw)


def granularity(name: Any, shape: tuple[int, ...], **kw) -> int:
  """Entries kept or dropped together: 1, bk bn (block), size / I (fan_in), size / C (channel)."""
  name, _, kw = _resolve(name, kw)
  size = int(np.prod(shape))
  if name == "block":
    bk, bn = _block_shape(kw.get("block"))
    return bk * bn
  if name == "fan_in":
    return size // shape[-2]
  if name == "channel":
    return size // shape[kw.get("axis", -1)]
  return 1


def is_fixed_density(name: Any) -> bool:
  """Whether the structure dictates its own density (nm, dense, fixed patterns)."""
  name, structure, _ = _resolve(name, {})
  return name in ("nm", "dense") or structure.pattern is not None


# ---------------------------------------------------------------------------------- helpers


def _check_density(name: str, density: Any, allow_none: bool) -> None:
  if density is None:
    if not allow_none:
      raise ValueError(f"structure {name!r} needs a density in (0, 1], got None")
    return
  if isinstance(density, jax.core.Tracer):
    return
  value = float(np.asarray(density))
  if not 0.0 < value <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {value} (structure {name!r})")


def _count(density: Any, n: int) -> Any:
  """round(density n): a Python int for a concrete density, an int32 scalar for a traced one."""
  if isinstance(density, jax.core.Tracer):
    return jnp.round(density * n).astype(jnp.int32)
  return int(round(float(np.asarray(density)) * n))


def keep_top_k(scores_GX: jax.Array, k: Any) -> jax.Array:
  """Bool `[..., X]`: per row the k highest scores, ties to the lower index (k may be traced).

  rank = inverse permutation of a stable descending argsort; keep = rank < k.
  """
  order_GX = jnp.argsort(-scores_GX, axis=-1, stable=True)
  rank_GX = jnp.argsort(order_GX, axis=-1)
  return rank_GX < k


def _require_matrix(name: str, shape: tuple[int, ...]) -> None:
  if len(shape) < 2:
    raise ValueError(f"structure {name!r} needs a kernel with >= 2 axes (inputs, outputs), got "
                     f"shape {shape}")


# ------------------------------------------------------------------------------ unstructured


def _unstructured_select(scores, k):
  return keep_top_k(scores.reshape(-1), k).reshape(scores.shape)


STRUCTURES.register("unstructured")(Structure(
    count=lambda shape, density: _count(density, int(np.prod(shape))),
    select=_unstructured_select, pool=lambda shape: int(np.prod(shape))))


# ------------------------------------------------------------------------------------- dense


STRUCTURES.register("dense")(Structure(
    count=lambda shape, density=None: int(np.prod(shape)),
    select=lambda scores, k: jnp.ones(scores.shape, jnp.bool_)))


# ------------------------------------------------------------------------------------- block


def _block_shape(block: Any) -> tuple[int, int]:
  if block is None:
    raise ValueError("structure 'block' needs block=(bk, bn) (or an int b for b x b)")
  if isinstance(block, (int, np.integer)):
    block = (int(block), int(block))
  if len(block) != 2 or min(block) < 1:
    raise ValueError(f"block must be two positive ints (bk, bn), got {block}")
  return int(block[0]), int(block[1])


def _block_check(shape, density, block=None):
  _require_matrix("block", shape)
  bk, bn = _block_shape(block)
  if shape[-2] % bk or shape[-1] % bn:
    raise ValueError(f"block {bk}x{bn} must tile the kernel's last two axes, got shape {shape}")


def _block_select(scores, k, block=None):
  bk, bn = _block_shape(block)
  *lead, rows, cols = scores.shape
  blocks_LRkCn = scores.reshape(*lead, rows // bk, bk, cols // bn, bn)
  block_scores_LRC = blocks_LRkCn.sum(axis=(-3, -1))
  keep_LRC = _unstructured_select(block_scores_LRC, k)
  keep_LRkCn = jnp.broadcast_to(keep_LRC[..., :, None, :, None], blocks_LRkCn.shape)
  return keep_LRkCn.reshape(scores.shape)


def _block_count(shape, density, block=None):
  bk, bn = _block_shape(block)
  num_blocks = int(np.prod(shape)) // (bk * bn)
  return _count(density, num_blocks) * bk * bn


def _block_pool(shape, block=None):
  bk, bn = _block_shape(block)
  return int(np.prod(shape)) // (bk * bn)


STRUCTURES.register("block")(Structure(count=_block_count, select=_block_select,
                                       check=_block_check, pool=_block_pool))


# ---------------------------------------------------------------------------------------- nm


def _nm_check(shape, density, n=None, m=None):
  _require_matrix("nm", shape)
  if n is None or m is None:
    raise ValueError(f"structure 'nm' needs n and m, got n={n}, m={m}")
  if not 0 < n <= m:
    raise ValueError(f"N:M sparsity needs 0 < N <= M, got N={n}, M={m}")
  if shape[-2] % m:
    raise ValueError(f"N:M with M={m} needs the input axis (size {shape[-2]}) to be a multiple "
                     f"of M; shape {shape}")
  if density is not None and not isinstance(density, jax.core.Tracer):
    if abs(float(density) - n / m) > 1e-9:
      raise ValueError(f"N:M {n}:{m} has density {n / m}; got density {density} (pass None or "
                       f"n / m)")


def _nm_select(scores, k, n=None, m=None):
  del k  # n of every m
  *lead, inputs, outputs = scores.shape
  groups_LGMO = scores.reshape(*lead, inputs // m, m, outputs)
  keep_LGOM = keep_top_k(jnp.swapaxes(groups_LGMO, -1, -2), n)
  return jnp.swapaxes(keep_LGOM, -1, -2).reshape(scores.shape)


STRUCTURES.register("nm")(Structure(
    count=lambda shape, density=None, n=None, m=None: int(np.prod(shape)) // m * n,
    select=_nm_select, check=_nm_check))


# ------------------------------------------------------------------------------------ fan_in


def _fan_in_select(scores, k):
  keep_LOI = keep_top_k(jnp.swapaxes(scores, -1, -2), k)
  return jnp.swapaxes(keep_LOI, -1, -2)


STRUCTURES.register("fan_in")(Structure(
    count=lambda shape, density: _count(density, shape[-2]) * (int(np.prod(shape)) // shape[-2]),
    select=_fan_in_select, pool=lambda shape: shape[-2],
    check=lambda shape, density: _require_matrix("fan_in", shape)))


# ----------------------------------------------------------------------------------- channel


def _channel_check(shape, density, axis=-1):
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"channel axis {axis} out of range for shape {shape}")


def _channel_select(scores, k, axis=-1):
  moved = jnp.moveaxis(scores, axis, -1)
  channel_scores_C = moved.reshape(-1, moved.shape[-1]).sum(axis=0)
  keep_C = keep_top_k(channel_scores_C, k)
  return jnp.moveaxis(jnp.broadcast_to(keep_C, moved.shape), -1, axis)


STRUCTURES.register("channel")(Structure(
    count=lambda shape, density, axis=-1: (_count(density, shape[axis])
                                           * (int(np.prod(shape)) // shape[axis])),
    select=_channel_select, check=_channel_check, pool=lambda shape, axis=-1: shape[axis]))


# --------------------------------------------------------------------------------- butterfly


def _butterfly_grid(shape, block):
  bk, bn = _block_shape(block if block is not None else 1)
  return shape[-2] // bk, shape[-1] // bn, bk, bn


def _butterfly_check(shape, density, block=None, levels=None):
  _require_matrix("butterfly", shape)
  bk, bn = _block_shape(block if block is not None else 1)
  if shape[-2] % bk or shape[-1] % bn:
    raise ValueError(f"butterfly block {bk}x{bn} must tile the last two axes, got shape {shape}")
  rows, cols = shape[-2] // bk, shape[-1] // bn
  n = min(rows, cols)
  if n & (n - 1) or max(rows, cols) % n:
    raise ValueError(f"butterfly needs a block grid whose smaller side is a power of two that "
                     f"divides the larger; got grid {rows}x{cols} (shape {shape}, block "
                     f"{bk}x{bn})")
  if levels is not None and not 0 <= levels <= int(math.log2(n)):
    raise ValueError(f"butterfly levels must be in [0, log2 {n}], got {levels}")


def _butterfly_levels(n: int, density: Any, levels: int | None) -> int:
  """Levels L whose density (1 + L) / n is nearest `density` (all levels for None)."""
  max_levels = int(math.log2(n))
  if levels is not None:
    return levels
  if density is None:
    return max_levels
  return int(np.clip(round(float(density) * n - 1), 0, max_levels))


def _butterfly_pattern(shape, density=None, block=None, levels=None):
  rows, cols, bk, bn = _butterfly_grid(shape, block)
  n = min(rows, cols)
  num_levels = _butterfly_levels(n, density, levels)
  r_R = np.arange(rows) * n // rows
  c_C = np.arange(cols) * n // cols
  xor_RC = r_R[:, None] ^ c_C[None, :]
  is_pow2_RC = (xor_RC & (xor_RC - 1)) == 0  # 0 or a power of two
  keep_RC = is_pow2_RC & (xor_RC < 2**num_levels)
  keep = np.repeat(np.repeat(keep_RC, bk, axis=0), bn, axis=1)
  return np.broadcast_to(keep, shape).copy()


STRUCTURES.register("butterfly")(Structure(
    count=lambda shape, density=None, **kw: int(_butterfly_pattern(shape, density, **kw).sum()),
    pattern=_butterfly_pattern, check=_butterfly_check))


# ----------------------------------------------------------------------------------- monarch


def _monarch_check(shape, density, nblocks=None):
  _require_matrix("monarch", shape)
  if nblocks is not None and not 1 <= nblocks <= min(shape[-2:]):
    raise ValueError(f"monarch nblocks must be in [1, {min(shape[-2:])}], got {nblocks}")


def _monarch_2d(inputs: int, outputs: int, nblocks: int) -> np.ndarray:
  i_I, j_O = np.arange(inputs), np.arange(outputs)
  diag_IO = (i_I[:, None] * nblocks // inputs) == (j_O[None, :] * nblocks // outputs)
  stride_IO = (i_I[:, None] % nblocks) == (j_O[None, :] % nblocks)
  return diag_IO | stride_IO


def _monarch_nblocks(inputs: int, outputs: int, density: Any) -> int:
  """nblocks whose pattern density is nearest `density` (about 2 / nblocks)."""
  if density is None:
    return max(1, int(round(math.sqrt(min(inputs, outputs)))))
  guess = 2.0 / float(density)
  candidates = {int(np.clip(c, 1, min(inputs, outputs)))
                for c in (math.floor(guess) - 1, math.floor(guess), math.ceil(guess),
                          math.ceil(guess) + 1)}
  return min(sorted(candidates),
             key=lambda c: abs(_monarch_2d(inputs, outputs, c).mean() - float(density)))


def _monarch_pattern(shape, density=None, nblocks=None):
  inputs, outputs = shape[-2:]
  nblocks = nblocks or _monarch_nblocks(inputs, outputs, density)
  return np.broadcast_to(_monarch_2d(inputs, outputs, nblocks), shape).copy()


STRUCTURES.register("monarch")(Structure(
    count=lambda shape, density=None, **kw: int(_monarch_pattern(shape, density, **kw).sum()),
    pattern=_monarch_pattern, check=_monarch_check))
