"""Named activation sites: read or replace a model's intermediate values without editing it.

A layer marks a value by passing it through `Site`, an identity module without params:
`h_BTF = Site(name="hidden")(h_BTF)`. A site's path is its module path joined by "/", e.g.
"layer_1/resid_post", "layer_1/ffn/hidden", "layer_0/attention/heads". Because a site is a
module, Flax records it with `capture_intermediates` and replaces its output with
`nn.intercept_methods`, so `collect` reads sites (for SAEs, neuron statistics, probes) and
`splice` rewrites them (SAE reconstructions, ablations, steering vectors) on any model that
marks them.

Site patterns: a path matches a pattern when it matches it as a shell glob (`fnmatch`, where
`*` also crosses "/") or, in full, as a regular expression: "layer_1/resid_post",
"layer_*/ffn/hidden", r"layer_[0-9]+/attention/heads". Every pattern must match at least one
site; one that matches none is a ValueError listing the model's site paths.
Sites play the part of TransformerLens's hook points (Nanda & Bloom 2022, "TransformerLens").
"""
import fnmatch
import functools
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax

SiteFn = Callable[[jax.Array], jax.Array]


class Site(nn.Module):
  """The identity x -> x at a named point of a model, where `collect` reads and `splice` writes."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def site_paths(model: nn.Module, *args: Any, **init_kwargs: Any) -> list[str]:
  """Every site path of `model` for the inputs `args`, in call order.

  Traced abstractly (`jax.eval_shape` of `model.init`), so nothing is computed. `init_kwargs`
  go to `model.init`, e.g. `deterministic=True`.
  """
  seen = []
  init = functools.partial(model.init, jax.random.key(0), *args, **init_kwargs)
  with nn.intercept_methods(_site_interceptor(seen, {})):
    jax.eval_shape(init)
  return _unique(seen)


def match_sites(
    model: nn.Module, *args: Any, sites: str | Sequence[str], **init_kwargs: Any
) -> list[str]:
  """The site paths of `model` (for the inputs `args`) that match any of `sites`, in call order."""
  patterns = _patterns("sites", sites)
  paths = site_paths(model, *args, **init_kwargs)
  _check_all_match(patterns, paths)
  return [path for path in paths if any(_matches(path, p) for p in patterns)]


def collect(
    model: nn.Module,
    variables: Any,
    *args: Any,
    sites: str | Sequence[str],
    **apply_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
  """Runs `model.apply(variables, *args, **apply_kwargs)`, recording the sites matching `sites`.

  Returns (outputs, {site_path: value}), paths in call order; `outputs` is what `apply` returns
  (with `mutable` in `apply_kwargs`, the pair (outputs, mutated variables) as usual). A site
  called n > 1 times (a module applied repeatedly) records the tuple of its n values. Works
  inside `jax.jit`.
  """
  patterns = _patterns("sites", sites)
  mutable = apply_kwargs.pop("mutable", False)
  seen = []

  def capture(module: nn.Module, method_name: str) -> bool:
    return (isinstance(module, Site) and method_name == "__call__"
            and any(_matches(_path(module), p) for p in patterns))

  with nn.intercept_methods(_site_interceptor(seen, {})):
    outputs, state = model.apply(
        variables, *args, capture_intermediates=capture, mutable=_with_intermediates(mutable),
        **apply_kwargs,
    )
  paths = _unique(seen)
  _check_all_match(patterns, paths)
  state = dict(state)
  calls = _site_calls(state.pop("intermediates", {}))
  captured = {path: calls[path] for path in paths if path in calls}
  if mutable is False:
    return outputs, captured
  return (outputs, state), captured


def splice(
    model: nn.Module,
    variables: Any,
    *args: Any,
    fns: Mapping[str, SiteFn],
    **apply_kwargs: Any,
) -> Any:
  """`model.apply(variables, *args, **apply_kwargs)` with each site's value x replaced by fn(x).

  `fns` maps site patterns to functions x -> x' of the same shape: a site matching several
  patterns gets them composed in the order of `fns`. E.g. {"layer_1/resid_post": sae_roundtrip}
  or {"layer_*/resid_post": lambda x: x + steering_D}. Returns what `apply` returns.
  """
  if not isinstance(fns, Mapping) or not fns:
    raise ValueError(f"fns must be a non-empty dict of site pattern -> function, got {fns!r}")
  patterns = _patterns("fns", list(fns))
  for pattern, fn in fns.items():
    if not callable(fn):
      raise ValueError(f"fns[{pattern!r}] must be a function x -> x, got {fn!r}")
  seen = []
  with nn.intercept_methods(_site_interceptor(seen, fns)):
    outputs = model.apply(variables, *args, **apply_kwargs)
  _check_all_match(patterns, _unique(seen))
  return outputs


def _site_interceptor(seen: list[str], fns: Mapping[str, SiteFn]) -> Callable[..., Any]:
  """A Flax method interceptor that appends each called site's path to `seen` and applies to
  its output every fn of `fns` whose pattern matches the path."""

  def intercept(next_fun, args, kwargs, context):
    if not isinstance(context.module, Site) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = _path(context.module)
    seen.append(path)
    value = next_fun(*args, **kwargs)
    for pattern, fn in fns.items():
      if _matches(path, pattern):
        value = fn(value)
    return value

  return intercept


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


def _matches(path: str, pattern: str) -> bool:
  """Whether `path` matches `pattern` as a shell glob or, in full, as a regular expression."""
  if fnmatch.fnmatchcase(path, pattern):
    return True
  try:
    return re.fullmatch(pattern, path) is not None
  except re.error:
    return False


def _patterns(argument: str, patterns: str | Sequence[str]) -> list[str]:
  """`patterns` as a non-empty list of strings, else a ValueError naming `argument`."""
  if isinstance(patterns, str):
    patterns = [patterns]
  if not isinstance(patterns, Sequence) or not patterns or not all(
      isinstance(p, str) and p for p in patterns
  ):
    raise ValueError(
        f"{argument} must be a site pattern or a non-empty list of them (non-empty strings, "
        f"e.g. 'layer_*/resid_post'), got {patterns!r}"
    )
  return list(patterns)


def _check_all_match(patterns: Sequence[str], paths: Sequence[str]) -> None:
  for pattern in patterns:
    if not any(_matches(path, pattern) for path in paths):
      raise ValueError(
          f"site pattern {pattern!r} matches no site; the model's sites: "
          f"{', '.join(paths) or '(none)'}"
      )


def _with_intermediates(mutable: Any) -> Any:
  """The `mutable` argument of `apply` extended by the "intermediates" collection."""
  if mutable is True:
    return True
  if mutable is False:
    return ["intermediates"]
  if isinstance(mutable, str):
    return [mutable, "intermediates"]
  if isinstance(mutable, Sequence) and all(isinstance(name, str) for name in mutable):
    return [*mutable, "intermediates"]
  raise ValueError(
      f"mutable={mutable!r}; collect allows a bool, a collection name or a list of them"
  )


def _site_calls(intermediates: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """{site path: value, or the tuple of values of a site called several times} from the
  "intermediates" collection, where a module's recorded calls sit under "__call__"."""
  calls = {}
  for name, value in intermediates.items():
    if name == "__call__":
      calls["/".join(prefix)] = value[0] if len(value) == 1 else tuple(value)
    elif isinstance(value, Mapping):
      calls.update(_site_calls(value, (*prefix, name)))
  return calls


def _unique(paths: Sequence[str]) -> list[str]:
  return list(dict.fromkeys(paths))
