"""Activation patching of named sites: run a model on one input with a site's value taken from
another input's run, at chosen positions and neurons, and sweep that over sites x positions.

With a clean input c and a corrupted input c' (e.g. one token changed), patching site s at
position t into the corrupted run gives outputs f(c' | s_t := s_t(c)); a metric m (a logit
difference, a cross-entropy) of it, compared with m(f(c)) and m(f(c')), says how much of the
clean behaviour that one activation restores. Sites come from `sparsejax.sites` (`collect`
reads the source run, `splice` writes into the target run), so any model marking sites works.
Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (causal tracing); Heimersheim
& Nanda 2024, "How to use and interpret activation patching".
"""
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from sparsejax import sites as sites_lib

INTO = ("corrupt", "clean")
Metric = Callable[[Any], jax.Array]


def patch(model: Any, variables: Any, clean_inputs: Any, corrupt_inputs: Any,
          site: str | Sequence[str], *, positions: jax.Array | None = None,
          neurons: jax.Array | None = None, into: str = "corrupt", **apply_kwargs: Any) -> Any:
  """`model.apply` on the `into` inputs ("corrupt": the corrupted ones, patched with clean
  values; "clean": the reverse) with every site matching `site` set, at positions (axis 1 of
  its [B, T, ...] value; all when None) and neurons (indices into its last axis; all when
  None), to its value in the run on the other inputs. Returns what `apply` returns."""
  if into not in INTO:
    raise ValueError(f"into={into!r}; allowed: {', '.join(INTO)}")
  source, target = (clean_inputs, corrupt_inputs) if into == "corrupt" else (corrupt_inputs,
                                                                             clean_inputs)
  _, captured = sites_lib.collect(model, variables, source, sites=site, **apply_kwargs)
  fns = {path: _replace_fn(path, value, positions, neurons) for path, value in captured.items()}
  return sites_lib.splice(model, variables, target, fns=fns, **apply_kwargs)


def patching_sweep(model: Any, variables: Any, clean_inputs: Any, corrupt_inputs: Any,
                   sites: str | Sequence[str], metric: Metric, *,
                   positions: Sequence[int] | None = None, into: str = "corrupt",
                   **apply_kwargs: Any) -> dict[str, Any]:
  """metric(patch(..., site=s, positions=[t])) for each site s matching `sites` and position t.

  Returns {"sites": the S site paths, "positions": int [P] (all T positions when None),
  "table_SP": float [S, P], "clean": metric of the clean run, "corrupt": metric of the
  corrupted run}. Every position of one site is run as one vmapped batch; all of it in one jit.
  """
  if into not in INTO:
    raise ValueError(f"into={into!r}; allowed: {', '.join(INTO)}")
  paths = sites_lib.match_sites(model, clean_inputs, sites=sites, **apply_kwargs)
  source, target = (clean_inputs, corrupt_inputs) if into == "corrupt" else (corrupt_inputs,
                                                                             clean_inputs)

  def sweep(variables, positions_P):
    source_out, captured = sites_lib.collect(model, variables, source, sites=paths,
                                             **apply_kwargs)
    target_out = model.apply(variables, target, **apply_kwargs)

    def one(path, position):
      fn = _replace_fn(path, captured[path], position[None], None)
      return metric(sites_lib.splice(model, variables, target, fns={path: fn}, **apply_kwargs))

    table_SP = jnp.stack([jax.vmap(lambda t, path=path: one(path, t))(positions_P)
                          for path in paths])
    clean_out, corrupt_out = ((source_out, target_out) if into == "corrupt"
                              else (target_out, source_out))
    return table_SP, metric(clean_out), metric(corrupt_out)

  seq_len = _seq_len(model, variables, clean_inputs, paths, **apply_kwargs)
  positions_P = jnp.arange(seq_len) if positions is None else jnp.asarray(positions, jnp.int32)
  table_SP, clean, corrupt = jax.jit(sweep)(variables, positions_P)
  return {"sites": paths, "positions": positions_P, "table_SP": table_SP, "clean": clean,
          "corrupt": corrupt}


def _seq_len(model: Any, variables: Any, inputs: Any, sites: Sequence[str],
             **apply_kwargs: Any) -> int:
  """T, the common axis-1 length of the [B, T, ...] values at `sites` (abstractly traced)."""
  shapes = jax.eval_shape(lambda x: sites_lib.collect(model, variables, x, sites=sites,
                                                      **apply_kwargs)[1], inputs)
  lengths = {path: (shape.shape[1] if isinstance(shape, jax.ShapeDtypeStruct)
                    and len(shape.shape) >= 2 else None) for path, shape in shapes.items()}
  if None in lengths.values() or len(set(lengths.values())) != 1:
    raise ValueError(f"sites must hold one [B, T, ...] value each, all with one T; got axis-1 "
                     f"lengths {lengths}")
  return next(iter(lengths.values()))


def logit_diff_metric(correct_B: jax.Array, wrong_B: jax.Array, position: int = -1) -> Metric:
  """The metric mean_b logits[b, position, correct_b] - logits[b, position, wrong_b], on a model
  output that is logits [B, T, V] or a tuple starting with them."""

  def metric(outputs: Any) -> jax.Array:
    logits_BV = _logits(outputs)[:, position]
    pick = lambda ids_B: jnp.take_along_axis(logits_BV, jnp.asarray(ids_B)[:, None], 1)[:, 0]
    return jnp.mean(pick(correct_B) - pick(wrong_B))

  return metric


def cross_entropy_metric(targets_BT: jax.Array, weights_BT: jax.Array | None = None) -> Metric:
  """The metric sum w CE(logits, targets) / sum w (w = 1 when None), on logits [B, T, V] or a
  tuple starting with them."""

  def metric(outputs: Any) -> jax.Array:
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(_logits(outputs), targets_BT)
    w_BT = jnp.ones(losses_BT.shape) if weights_BT is None else jnp.asarray(weights_BT)
    return jnp.sum(losses_BT * w_BT) / jnp.sum(w_BT)

  return metric


def _logits(outputs: Any) -> jax.Array:
  return outputs[0] if isinstance(outputs, tuple) else outputs


def _replace_fn(path: str, source: Any, positions: jax.Array | None,
                neurons: jax.Array | None) -> Callable[[jax.Array], jax.Array]:
  """x -> x with x[:, positions, ..., neurons] taken from `source` (all where None)."""
  if not isinstance(source, jax.Array) or source.ndim < 2:
    raise ValueError(f"site {path!r} holds {type(source).__name__}; patching needs one array "
                     f"[B, T, ...] per site (a site called once)")
  mask = jnp.ones(source.shape, bool)
  if positions is not None:
    keep_T = jnp.zeros(source.shape[1], bool).at[jnp.asarray(positions, jnp.int32)].set(True)
    mask &= keep_T.reshape((1, -1) + (1,) * (source.ndim - 2))
  if neurons is not None:
    mask &= jnp.zeros(source.shape[-1], bool).at[jnp.asarray(neurons, jnp.int32)].set(True)
  return lambda x: jnp.where(mask, source, x)
