"""The LISTA claim's metrics and claim check on hand cases."""
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

