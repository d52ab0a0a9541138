"""The synthetic SAE claim: its recovery metric, selection, table and judge on hand cases."""
import jax
import jax.numpy as jnp
import numpy as np

from experiments.claims import sae_synthetic


def test_a_permuted_rescaled_copy_of_the_true_dictionary_recovers_every_atom():
  true_MD = sae_synthetic.true_dictionary(jax.random.PRNGKey(0), 12, 5)
  perm = np.random.default_rng(0).permutation(12)
  decoder_ND = jnp.concatenate([true_MD[perm] * 3.0, jnp.zeros((4, 5))])  # extra dead rows
  assert float(sae_synthetic.recovered_fraction(true_MD, decoder_ND)) == 1.0


def test_recovered_fraction_hand_case():
  true_MD = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
  # Row 0 is atom 0 rescaled, row 1 is atom 3 (cos 0.8 with atom 1), row 2 is atom 2 negated.
  decoder_ND = jnp.array([[2.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, -1.0]])
  # Max cosines: atom 0: 1, atom 1: 0.8 (< 0.9), atom 2: 0 (its match is negated), atom 3: 1.
  np.testing.assert_allclose(sae_synthetic.recovered_fraction(true_MD, decoder_ND), 0.5)


def test_select_at_equal_l0_keeps_the_closest_sweep_point():
  rows = [{"architecture": "relu", "l0": 9.0}, {"architecture": "relu", "l0": 3.5},
          {"architecture": "relu", "l0": 1.0}, {"architecture": "topk", "l0": 4.0}]
  selected = sae_synthetic.select_at_equal_l0(rows, 4.0)
  assert selected == [{"architecture": "relu", "l0": 3.5}, {"architecture": "topk", "l0": 4.0}]


def _payload(fvu: dict[str, list[float]], l0: dict[str, float]) -> dict:
  """Selected rows per architecture and seed with the given FVUs and L0s."""
  selected = [{"architecture": kind, "coefficient": 0.1, "l0": l0[kind], "fvu": value,
               "recovered": 1.0, "dead_fraction": 0.0, "shrinkage": 1.0, "seed": seed}
              for kind, values in fvu.items() for seed, value in enumerate(values)]
  return {"setup": {}, "runs": selected, "selected": selected, "checks": []}


L0 = {"topk": 4.0, "batchtopk": 4.0, "relu": 4.2, "jumprelu": 3.5}


def test_judge_yes_when_all_three_beat_relu_beyond_the_spread():
  reproduced, verdict = sae_synthetic.judge(_payload(
      {"topk": [0.15, 0.17], "batchtopk": [0.18, 0.18], "relu": [0.38, 0.40],
       "jumprelu": [0.19, 0.19]}, L0))
  assert reproduced == "yes"
  assert "ReLU + L1 0.390 ± 0.014 at L0 4.20" in verdict and "3 of 3" in verdict
  assert "Atoms recovered (mean; target > 90 %): TopK 100.0 %" in verdict


def test_judge_partly_when_a_winner_recovers_too_few_atoms():
  payload = _payload({"topk": [0.15, 0.17], "batchtopk": [0.18, 0.18], "relu": [0.38, 0.40],
                      "jumprelu": [0.19, 0.19]}, L0)
  for row in payload["selected"]:
    if row["architecture"] == "batchtopk":
      row["recovered"] = 0.8 + 0.1 * row["seed"]  # mean 0.85: under the 90 % target
  reproduced, verdict = sae_synthetic.judge(payload)
  assert reproduced == "partly" and "BatchTopK 85.0 %" in verdict


def test_judge_partly_inside_the_spread_or_at_a_denser_l0_and_no():
  inside = {"topk": [0.10, 0.50], "batchtopk": [0.5, 0.5], "relu": [0.39, 0.39],
            "jumprelu": [0.5, 0.5]}
  assert sae_synthetic.judge(_payload(inside, L0))[0] == "partly"
  denser = {"topk": [0.1, 0.1], "batchtopk": [0.1, 0.1], "relu": [0.39, 0.39],
            "jumprelu": [0.1, 0.1]}
  # JumpReLU at twice ReLU's L0 does not count as a win at equal L0.
  assert sae_synthetic.judge(_payload(denser, {**L0, "jumprelu": 8.4}))[0] == "partly"
  worse = {"topk": [0.5, 0.5], "batchtopk": [0.5, 0.5], "relu": [0.39, 0.39],
           "jumprelu": [0.5, 0.5]}
  assert sae_synthetic.judge(_payload(worse, L0))[0] == "no"


def test_table_cells_are_mean_and_std_over_seeds():
  text = sae_synthetic.table(_payload(
      {"topk": [0.15, 0.17], "batchtopk": [0.18, 0.18], "relu": [0.38, 0.40],
       "jumprelu": [0.19, 0.19]}, L0))
  assert "| TopK | - | 4.00 ± 0.00 | 0.160 ± 0.014 | 100.0 ± 0.0 | 0 ± 0 | 1.000 ± 0.000 |" in text
  assert "| ReLU + L1 | 0.1 | 4.20 ± 0.00 | 0.390 ± 0.014 |" in text
