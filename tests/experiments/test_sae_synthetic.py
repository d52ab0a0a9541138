"""The synthetic SAE claim: its recovery metric on hand cases, and a --quick run end to end."""
import json
import os

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


def test_quick_mode_writes_the_results(tmp_path):
  sae_synthetic.main(["--quick", "--out", str(tmp_path)])
  with open(os.path.join(tmp_path, "sae_synthetic.json")) as f:
    results = json.load(f)
  assert [r["architecture"] for r in results["selected"]] == ["topk", "batchtopk", "relu",
                                                               "jumprelu"]
  assert len(results["runs"]) == 2 + len(sae_synthetic.QUICK.l1_coeffs) + len(
      sae_synthetic.QUICK.l0_coeffs)
  for row in results["runs"]:
    assert all(np.isfinite(row[name]) for name in ("fvu", "l0", "recovered", "shrinkage"))
    assert 0.0 <= row["recovered"] <= 1.0
  np.testing.assert_allclose(results["selected"][0]["l0"], sae_synthetic.QUICK.k)
  assert set(results["claims"]) == {f"{kind}_{check}" for kind in ("topk", "batchtopk",
                                                                   "jumprelu")
                                    for check in ("recovers_over_90pct", "beats_relu_fvu")}
  with open(os.path.join(tmp_path, "sae_synthetic.md")) as f:
    assert f.read().count("\n") == 6  # header, rule, four architectures
