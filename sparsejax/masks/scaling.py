"""Sparse scaling laws: fit L(S, N, D) to runs, the optimal sparsity per budget, and comparisons
of sparse runs with dense ones at equal non-zero parameters or equal FLOPs.

Host-side NumPy / SciPy analysis of finished runs (not jit code): a notebook and the
`python -m experiments.scaling` tool share it. Follows Frantar et al. 2023, "Scaling Laws for
Sparsely-Connected Foundation Models".
"""
import dataclasses
import itertools
from typing import Sequence

import numpy as np
from scipy import optimize

PARAM_NAMES = ("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c")
_LOG_PARAMS = ("a_S", "c_S", "a_D", "c")  # fitted as logs: positive, scale-free
_MIN_LOG = -30.0  # lower bound of a log-fitted param (c_S may truly be 0)
MAX_SPARSITY = 0.999


@dataclasses.dataclass(frozen=True)
class ScalingFit:
  """Fitted law params (PARAM_NAMES), the RMS of log(L_pred / L) over the points, and count."""
  params: dict[str, float]
  rms_log_residual: float
  num_points: int


def sparse_scaling_loss(params: dict[str, float], sparsity, nonzero_params, tokens) -> np.ndarray:
  """Predicted loss of the sparse scaling law.

  L(S, N, D) = (a_S (1 - S)^b_S + c_S) (1 / N)^b_N + (a_D / D)^b_D + c, with S the sparsity, N the
  non-zero parameters and D the training tokens (Frantar et al. 2023, eq. 1).
  """
  s, n, d = (np.asarray(v, np.float64) for v in (sparsity, nonzero_params, tokens))
  p = params
  return ((p["a_S"] * (1.0 - s) ** p["b_S"] + p["c_S"]) * n ** -p["b_N"]
          + (p["a_D"] / d) ** p["b_D"] + p["c"])


def _to_params(theta: np.ndarray) -> dict[str, float]:
  return {name: float(np.exp(v) if name in _LOG_PARAMS else v)
          for name, v in zip(PARAM_NAMES, theta)}


def _to_theta(params: dict[str, float]) -> np.ndarray:
  return np.array([np.log(max(params[n], np.exp(_MIN_LOG))) if n in _LOG_PARAMS else params[n]
                   for n in PARAM_NAMES])


def _check_points(sparsity, nonzero_params, tokens, loss) -> tuple[np.ndarray, ...]:
  arrays = tuple(np.asarray(v, np.float64).ravel() for v in (sparsity, nonzero_params, tokens,
                                                              loss))
  if len({a.size for a in arrays}) != 1:
    raise ValueError(f"sparsity, nonzero_params, tokens, loss have sizes "
                     f"{[a.size for a in arrays]}; they must be equal")
  s, n, d, l = arrays
  if s.size < len(PARAM_NAMES):
    raise ValueError(f"{s.size} points cannot fit {len(PARAM_NAMES)} law params; need >= 7")
  if np.any((s < 0) | (s >= 1)):
    raise ValueError(f"sparsity={s.tolist()} must lie in [0, 1)")
  for name, a in (("nonzero_params", n), ("tokens", d), ("loss", l)):
    if np.any(a <= 0):
      raise ValueError(f"{name}={a.tolist()} must be positive")
  return arrays


def _initial_guesses(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
  """A small grid of starts: exponents from a grid, scales matching the loss range."""
  starts = []
  c = 0.5 * loss.min()
  gap = max(loss.mean() - c, 1e-3)
  for b_n, b_d, b_s in itertools.product((0.2, 0.5), (0.2, 0.5), (0.5, 1.0)):
    a_s = 0.5 * gap * np.median(n) ** b_n  # the N term takes about half the gap
    a_d = np.median(d) * (0.5 * gap) ** (1.0 / b_d)
    starts.append(_to_theta({"a_S": a_s, "b_S": b_s, "c_S": 0.1 * a_s, "b_N": b_n, "a_D": a_d,
                             "b_D": b_d, "c": c}))
  return starts


def fit_sparse_scaling_law(sparsity, nonzero_params, tokens, loss,
                           init: dict[str, float] | None = None) -> ScalingFit:
  """Least-squares fit of `sparse_scaling_loss` to measured points, in log space.

  minimises Σ_i (log L(S_i, N_i, D_i) - log loss_i)^2 over a_S, c_S, a_D, c > 0 (fitted as
  logs) and exponents b_S, b_N, b_D in [0, 4], from `init` or a grid of starts (the best wins);
  the log residual weighs every point by its relative error, as Frantar et al. 2023 fit theirs.
  """
  s, n, d, l = _check_points(sparsity, nonzero_params, tokens, loss)
  log_l = np.log(l)
  lower = np.array([_MIN_LOG if p in _LOG_PARAMS else 0.0 for p in PARAM_NAMES])
  upper = np.array([np.inf if p in _LOG_PARAMS else 4.0 for p in PARAM_NAMES])

  def residuals(theta):
    return np.log(sparse_scaling_loss(_to_params(theta), s, n, d)) - log_l

  starts = [_to_theta(init)] if init is not None else _initial_guesses(n, d, l)
  best = min((optimize.least_squares(residuals, np.clip(x0, lower, upper), bounds=(lower, upper),
                                     x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12)
              for x0 in starts), key=lambda r: r.cost)
  return ScalingFit(params=_to_params(best.x),
                    rms_log_residual=float(np.sqrt(np.mean(best.fun ** 2))), num_points=s.size)


def tokens_at_budget(sparsity, nonzero_params, train_flops, flops_per_param_token: float = 6.0):
  """Tokens a training budget buys when sparse training costs as much as dense training.

  D = C (1 - S) / (k N): the dense-equivalent model has N / (1 - S) params, each token costs k
  FLOPs per param (k = 6: forward and backward), Frantar et al. 2023 §3's cost model.
  """
  s = np.asarray(sparsity, np.float64)
  return train_flops * (1.0 - s) / (flops_per_param_token * np.asarray(nonzero_params, np.float64))


def optimal_sparsity(params: dict[str, float], nonzero_params: float, train_flops: float,
                     flops_per_param_token: float = 6.0,
                     max_sparsity: float = MAX_SPARSITY) -> dict[str, float]:
  """The sparsity minimising predicted loss at N non-zero params and training compute C.

  S* = argmin_{0 <= S <= max_sparsity} L(S, N, D(S)), D(S) = C (1 - S) / (k N) (see
  `tokens_at_budget`): more sparsity means a larger dense-equivalent model trained on fewer
  tokens. Returns {"sparsity", "tokens", "loss", "dense_loss"} (dense_loss at S = 0). The
  "optimal sparsity contour" of Frantar et al. 2023 §3.
  """
  if not 0.0 < max_sparsity < 1.0:
    raise ValueError(f"max_sparsity={max_sparsity} must lie in (0, 1)")
  if nonzero_params <= 0 or train_flops <= 0:
    raise ValueError(f"nonzero_params={nonzero_params}, train_flops={train_flops}: both must be "
                     f"positive")

  def loss_at(s):
    return float(sparse_scaling_loss(params, s, nonzero_params, tokens_at_budget(
        s, nonzero_params, train_flops, flops_per_param_token)))

  grid = np.linspace(0.0, max_sparsity, 201)
  i = int(np.argmin([loss_at(s) for s in grid]))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
  s_best = optimize.minimize_scalar(loss_at, bounds=(lo, hi), method="bounded",
                                    options={"xatol": 1e-7}).x
  s_best = min((grid[i], s_best), key=loss_at)
  return {"sparsity": float(s_best),
          "tokens": float(tokens_at_budget(s_best, nonzero_params, train_flops,
                                           flops_per_param_token)),
          "loss": loss_at(s_best), "dense_loss": loss_at(0.0)}


def interpolate_loglog(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
  """y at x, piecewise linear in (log x, log y) between the bracketing points; None outside.

  log y = log y_i + (log x - log x_i) (log y_{i+1} - log y_i) / (log x_{i+1} - log x_i), i.e. a
  power law between neighbours; no extrapolation. Repeated xs are averaged (in log y) first.
  """
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  if xs.size == 0 or np.any(xs <= 0) or np.any(ys <= 0) or x <= 0:
    raise ValueError(f"xs={xs.tolist()}, ys={ys.tolist()}, x={x}: need at least one point and "
                     f"all values positive")
  ux = np.unique(xs)
  log_y = np.array([np.mean(np.log(ys[xs == u])) for u in ux])
  if not ux[0] * (1 - 1e-9) <= x <= ux[-1] * (1 + 1e-9):
    return None
  return float(np.exp(np.interp(np.log(x), np.log(ux), log_y)))


def compare_to_dense(rows: Sequence[dict], key: str, same: Sequence[str] = ()) -> list[dict]:
  """Each sparse row's loss beside the dense runs' loss at the same `key` (e.g. "nonzero_params"
  or "flops"), among dense runs that equal it in every field of `same` (e.g. ("tokens",)).

  A row is dense when its "density" is 1. For a sparse row r: dense_loss = the loss of the dense
  rows d with d[f] == r[f] for f in `same`, interpolated log-log at r[key] (`interpolate_loglog`;
  None outside their range) and delta = r["loss"] - dense_loss (negative: the sparse run wins).
  The equal-parameter / equal-FLOPs comparison of sparse with dense models that sparse-vs-dense
  studies report (Frantar et al. 2023).
  """
  dense = [r for r in rows if r["density"] >= 1.0]
  if not dense:
    raise ValueError(f"rows hold no dense run (density 1) to compare at equal {key}")
  out = []
  for r in rows:
    if r["density"] >= 1.0:
      continue
    peers = [d for d in dense if all(d[f] == r[f] for f in same)]
    ref = (interpolate_loglog([d[key] for d in peers], [d["loss"] for d in peers], r[key])
           if peers else None)
    out.append({**r, "dense_loss": ref, "delta": None if ref is None else r["loss"] - ref})
  return out
