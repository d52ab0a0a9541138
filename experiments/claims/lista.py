"""Claim: LISTA with T = 10 unrolled iterations recovers sparse codes about as well as ISTA does
with ~10x more iterations (Gregor & LeCun 2010, "Learning Fast Approximations of Sparse Coding").

  python -m experiments.claims lista [--seeds 3] [--fast]

Data: a random dictionary D (D x N, unit-norm Gaussian atoms) and codes z* with each entry on
independently with probability `density`, amplitudes N(0, 1); signals y = D z* (noiseless).
LISTA (`sparsejax.coding.LISTA`, untied, l1) starts as ISTA with step 1/L and weight `lam`
(`lista_params`) and is trained with Adam on fresh batches to minimise ||z - z*||^2 (the
ground-truth codes, as in Chen et al. 2018, "Theoretical Linear Convergence of Unfolded ISTA").
ISTA (`sparsejax.coding.ista`, step 1/L, the same lam) runs T in `ista_iters`. On held-out
signals the table reports NMSE = ||z - z*||^2 / ||z*||^2 in dB and the F1 score of the
recovered support {n : z_n != 0} (true codes hold density * N = 6.4 nonzeros on average), and the
fewest ISTA iterations in the sweep that match LISTA's NMSE. Each seed draws its own dictionary,
data and LISTA training batches.

A full run (3 seeds) takes about 15 s of CPU time per seed (45-55 s wall per seed on a heavily
shared 2-core CPU); `--fast` (tiny sizes) takes seconds.
"""
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

from experiments import claims
from sparsejax import coding

@dataclasses.dataclass(frozen=True)
class Setup:
  """Sizes and training settings of one run of the claim."""

  signal_dim: int = 32
  num_atoms: int = 64
  density: float = 0.1
  lam: float = 0.05
  lista_iters: int = 10
  ista_iters: tuple[int, ...] = (10, 20, 50, 100, 200, 300, 500, 1000)
  batch_size: int = 256
  num_steps: int = 3000
  learning_rate: float = 1e-3
  eval_signals: int = 2048
  seed: int = 0


FULL = Setup()
QUICK = Setup(signal_dim=8, num_atoms=16, lista_iters=3, ista_iters=(3, 30), batch_size=32,
              num_steps=20, eval_signals=64)


def sample(key: jax.Array, dictionary_DN: jax.Array, num_signals: int,
           density: float) -> tuple[jax.Array, jax.Array]:
  """(y_BD, z_BN): codes with Bernoulli(density) supports and N(0, 1) amplitudes, y = D z."""
  on_key, value_key = jax.random.split(key)
  shape = (num_signals, dictionary_DN.shape[1])
  z_BN = jax.random.bernoulli(on_key, density, shape) * jax.random.normal(value_key, shape)
  return z_BN @ dictionary_DN.T, z_BN


def nmse_db(z_BN: jax.Array, target_BN: jax.Array) -> float:
  """10 log10(sum ||z - z*||^2 / sum ||z*||^2)."""
  return float(10 * jnp.log10(jnp.sum((z_BN - target_BN) ** 2) / jnp.sum(target_BN ** 2)))


def support_f1(z_BN: jax.Array, target_BN: jax.Array) -> float:
  """F1 of the predicted support {z != 0} against the true support {z* != 0}, over all entries."""
  predicted, true = z_BN != 0, target_BN != 0
  hits = jnp.sum(predicted & true)
  return float(2 * hits / (jnp.sum(predicted) + jnp.sum(true)))


def train_lista(setup: Setup, dictionary_DN: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
  """LISTA params from the ISTA start after `num_steps` Adam steps on ||z - z*||^2."""
  params = coding.lista_params(dictionary_DN, setup.lam, setup.lista_iters)
  optimizer = optax.adam(setup.learning_rate)

  def loss(params, y_BD, z_BN):
    return jnp.mean(jnp.sum((coding.lista_apply(params, y_BD) - z_BN) ** 2, axis=-1))

  def step(carry, key):
    params, opt_state = carry
    y_BD, z_BN = sample(key, dictionary_DN, setup.batch_size, setup.density)
    grads = jax.grad(loss)(params, y_BD, z_BN)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  train = jax.jit(lambda carry, keys: jax.lax.scan(step, carry, keys)[0])
  params, _ = train((params, optimizer.init(params)), jax.random.split(key, setup.num_steps))
  return params


def evaluate(method: str, iterations: int, codes_BN: jax.Array, target_BN: jax.Array) -> dict:
  """The table row: NMSE (dB), support F1 and mean nonzeros per code ("l0")."""
  return {"method": method, "iterations": iterations, "nmse_db": nmse_db(codes_BN, target_BN),
          "support_f1": support_f1(codes_BN, target_BN),
          "l0": float(jnp.mean(jnp.sum(codes_BN != 0, axis=-1)))}


def run_setup(setup: Setup) -> list[dict]:
  """One row per method and iteration count, measured on held-out signals (`evaluate`)."""
  dict_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(setup.seed), 3)

  @jax.jit
  def problem():
    dictionary_DN = coding.random_dictionary(dict_key, setup.signal_dim, setup.num_atoms)
    y_BD, z_BN = sample(eval_key, dictionary_DN, setup.eval_signals, setup.density)
    return dictionary_DN, y_BD, z_BN, coding.lipschitz_step(dictionary_DN)

  dictionary_DN, y_BD, z_BN, step = problem()
  rows = []
  for iters in setup.ista_iters:
    codes_BN = jax.jit(coding.ista, static_argnums=(4,))(y_BD, dictionary_DN, setup.lam, step,
                                                         iters)
    rows.append(evaluate("ista", iters, codes_BN, z_BN))
  params = train_lista(setup, dictionary_DN, train_key)
  codes_BN = jax.jit(coding.lista_apply)(params, y_BD)
  rows.append(evaluate("lista", setup.lista_iters, codes_BN, z_BN))
  return rows


def claim_checks(rows: list[dict]) -> dict:
  """The fewest ISTA iterations whose NMSE is at most LISTA's (None: none in the sweep)."""
  lista_row = next(r for r in rows if r["method"] == "lista")
  matching = [r["iterations"] for r in rows
              if r["method"] == "ista" and r["nmse_db"] <= lista_row["nmse_db"]]
  return {"lista_iterations": lista_row["iterations"],
          "ista_iterations_to_match_lista_nmse": min(matching) if matching else None}


def run(seeds: Sequence[int], fast: bool) -> dict:
  """`run_setup` per seed (`fast`: the QUICK sizes): rows tagged with their seed, and per seed
  the fewest ISTA iterations that match LISTA (`claim_checks`)."""
  base = QUICK if fast else FULL
  rows, matches = [], []
  for seed in seeds:
    clock = time.perf_counter()
    seed_rows = [{**row, "seed": seed} for row in run_setup(dataclasses.replace(base, seed=seed))]
    rows += seed_rows
    matches.append({"seed": seed, **claim_checks(seed_rows)})
    print(f"seed {seed}: {matches[-1]} ({time.perf_counter() - clock:.1f} s)", flush=True)
  setup = dataclasses.asdict(base)
  setup.pop("seed")
  return {"setup": setup, "rows": rows, "matches": matches}


def _by_method(rows: list[dict], metric: str) -> dict[tuple[str, int], list[float]]:
  """{(method, iterations): [metric per seed]} in first-seen order."""
  out: dict[tuple[str, int], list[float]] = {}
  for row in rows:
    out.setdefault((row["method"], row["iterations"]), []).append(row[metric])
  return out


def table(payload: dict) -> str:
  nmse, f1, l0 = (_by_method(payload["rows"], m) for m in ("nmse_db", "support_f1", "l0"))
  text = claims.markdown_table(
      ["method", "iterations", "NMSE (dB)", "support F1", "nonzeros per code"],
      [[m, t, claims.fmt(nmse[m, t], 1), claims.fmt(f1[m, t]), claims.fmt(l0[m, t], 1)]
       for m, t in nmse])
  matched = ", ".join(str(m["ista_iterations_to_match_lista_nmse"]) for m in payload["matches"])
  return text + f"\n\nISTA iterations needed to match LISTA's NMSE, per seed: {matched}."


def judge(payload: dict) -> tuple[str, str]:
  """yes if in every seed ISTA needs >= 10x LISTA's iterations to match its NMSE, partly if it
  needs more than LISTA's in every seed, no otherwise."""
  ratios = [np.inf if m["ista_iterations_to_match_lista_nmse"] is None
            else m["ista_iterations_to_match_lista_nmse"] / m["lista_iterations"]
            for m in payload["matches"]]
  reproduced = "yes" if min(ratios) >= 10 else "partly" if min(ratios) > 1 else "no"
  nmse = _by_method(payload["rows"], "nmse_db")
  lista_iters = payload["matches"][0]["lista_iterations"]
  matched = [m["ista_iterations_to_match_lista_nmse"] for m in payload["matches"]]
  return reproduced, (
      f"LISTA-{lista_iters} reaches {claims.fmt(nmse['lista', lista_iters], 1)} dB NMSE "
      f"(ISTA-{lista_iters}: {claims.fmt(nmse['ista', lista_iters], 1)} dB); ISTA needs "
      f"{', '.join('more than the sweep' if t is None else str(t) for t in matched)} iterations "
      f"to match it ({len(matched)} seeds).")


def plot(payload: dict, path: str) -> None:
  """NMSE against iterations (log x): ISTA's sweep per seed, LISTA's points."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for method, style in (("ista", "o-"), ("lista", "s")):
    for seed in sorted({r["seed"] for r in payload["rows"]}):
      rows = [r for r in payload["rows"] if r["method"] == method and r["seed"] == seed]
      ax.plot([r["iterations"] for r in rows], [r["nmse_db"] for r in rows], style,
              color="tab:blue" if method == "ista" else "tab:red", markersize=4, alpha=0.7,
              label=method.upper() if seed == payload["rows"][0]["seed"] else None)
  ax.set_xscale("log")
  ax.set_xlabel("iterations")
  ax.set_ylabel("held-out NMSE (dB)")
  ax.set_title("LISTA vs ISTA, one line per seed", fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


CLAIM = claims.Claim(
    name="lista",
    title="LISTA vs ISTA",
    source="Gregor & LeCun 2010, Learning Fast Approximations of Sparse Coding; Chen et al. 2018, "
           "Theoretical Linear Convergence of Unfolded ISTA",
    statement="A learned ISTA unrolled for a fixed small number of iterations (LISTA) reaches the "
              "code accuracy that plain ISTA needs an order of magnitude more iterations for.",
    setup="Noiseless sparse coding: a random 32 x 64 unit-norm Gaussian dictionary, codes with "
          "each entry on with probability 0.1 and N(0, 1) amplitudes. Untied 10-layer LISTA "
          "initialised as ISTA (step 1/L, lam 0.05), trained with Adam on fresh batches on the "
          "squared code error; ISTA with the same step and lam for 10 to 1000 iterations; both "
          "measured on held-out signals. Each seed draws its own dictionary and data.",
    expected="ISTA needs >= 10x LISTA's 10 iterations to match LISTA's NMSE",
    run=run, table=table, judge=judge, plot=plot, default_seeds=3, minutes=2)
