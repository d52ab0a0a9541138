"""The AC/DC claim's table and judge on hand cases."""
from experiments.claims import acdc_mlp


def _payload(accuracy: dict[str, list[float]]) -> dict:
  runs = [{"method": m, "sparsity": 0.9, "seed": s, "test_accuracy": a, "density": 0.1}
          for m, values in accuracy.items() for s, a in enumerate(values)]
  return {"runs": runs, "sparsity": 0.9, "num_steps": 10}


def test_judge_yes_when_acdc_beats_both_beyond_the_spread():
  reproduced, verdict = acdc_mlp.judge(_payload(
      {"rigl": [0.97, 0.96], "gmp": [0.98, 0.98], "acdc": [0.99, 0.99]}))
  assert reproduced == "yes"
  assert "AC/DC 99.00 ± 0.00 %, GMP 98.00 ± 0.00 %, RigL 96.50 ± 0.71 %" in verdict
  assert "AC/DC - GMP +1.00 and AC/DC - RigL +2.50 points, both" in verdict


def test_judge_partly_inside_the_spread_and_no_below_both():
  inside = {"rigl": [0.97, 0.96], "gmp": [0.98, 0.96], "acdc": [0.99, 0.96]}
  assert acdc_mlp.judge(_payload(inside))[0] == "partly"
  below = {"rigl": [0.97, 0.97], "gmp": [0.98, 0.98], "acdc": [0.90, 0.90]}
  assert acdc_mlp.judge(_payload(below))[0] == "no"


def test_table_cells():
  text = acdc_mlp.table(_payload({"rigl": [0.97, 0.96], "gmp": [0.98, 0.98],
                                  "acdc": [0.99, 0.99]}))
  assert "| rigl | 96.50 ± 0.71 | 10.00 ± 0.00 |" in text
