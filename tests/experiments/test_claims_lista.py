"""The LISTA claim's metrics, claim check, table and judge on hand cases."""
import jax.numpy as jnp
import numpy as np

from experiments.claims import lista


def test_nmse_and_support_f1_hand_case():
  target = jnp.array([[1.0, 0.0, 2.0, 0.0]])
  codes = jnp.array([[1.0, 0.5, 0.0, 0.0]])
  # error: 0.25 + 4 over energy 5 -> 0.85; supports {0, 1} vs {0, 2}: F1 = 2 * 1 / (2 + 2).
  np.testing.assert_allclose(lista.nmse_db(codes, target), 10 * np.log10(0.85), rtol=1e-5)
  np.testing.assert_allclose(lista.support_f1(codes, target), 0.5)


def test_claim_checks_picks_the_fewest_matching_ista_iterations():
  rows = [{"method": "ista", "iterations": 10, "nmse_db": -3.0},
          {"method": "ista", "iterations": 100, "nmse_db": -12.0},
          {"method": "ista", "iterations": 300, "nmse_db": -16.0},
          {"method": "lista", "iterations": 10, "nmse_db": -12.0}]
  assert lista.claim_checks(rows) == {"lista_iterations": 10,
                                      "ista_iterations_to_match_lista_nmse": 100}


def _payload(matched: list[int | None]) -> dict:
  rows, matches = [], []
  for seed, ista_iters in enumerate(matched):
    rows += [{"method": "ista", "iterations": 10, "nmse_db": -3.0 - seed, "support_f1": 0.2,
              "l0": 40.0, "seed": seed},
             {"method": "lista", "iterations": 10, "nmse_db": -15.0 - seed, "support_f1": 0.4,
              "l0": 25.0, "seed": seed}]
    matches.append({"seed": seed, "lista_iterations": 10,
                    "ista_iterations_to_match_lista_nmse": ista_iters})
  return {"setup": {}, "rows": rows, "matches": matches}


def test_judge_yes_when_every_seed_needs_ten_times_the_iterations():
  reproduced, verdict = lista.judge(_payload([300, 100, None]))
  assert reproduced == "yes"
  assert "-16.0 ± 1.0 dB" in verdict and "300, 100, more than the sweep" in verdict


def test_judge_partly_and_no():
  assert lista.judge(_payload([300, 50]))[0] == "partly"  # one seed only 5x
  assert lista.judge(_payload([300, 10]))[0] == "no"  # ISTA-10 already matches in one seed


def test_table_cells_are_mean_and_std_over_seeds():
  text = lista.table(_payload([300, 100]))
  assert "| ista | 10 | -3.5 ± 0.7 | 0.200 ± 0.000 | 40.0 ± 0.0 |" in text
  assert text.endswith("per seed: 300, 100.")
