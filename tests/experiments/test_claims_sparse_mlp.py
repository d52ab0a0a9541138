"""The sparse-MLP claim's judge on hand cases (its runs train 27 MLPs: too slow here)."""
from experiments.claims import sparse_mlp


def _payload(accuracy: dict[str, list[float]]) -> dict:
  """Runs at 98 % sparsity (dense at 0 %) with the given per-seed test accuracies."""
  runs = [{"method": m, "sparsity": 0.0 if m == "dense" else 0.98, "seed": s,
           "test_accuracy": a, "density": 1.0 if m == "dense" else 0.02}
          for m, values in accuracy.items() for s, a in enumerate(values)]
  return {"runs": runs, "sparsities": [0.98], "num_steps": 10}


def test_judge_yes_only_when_both_gaps_exceed_the_seed_spread():
  accuracy = {"dense": [0.99, 0.99], "static": [0.70, 0.72], "set": [0.90, 0.90],
              "rigl": [0.94, 0.96], "srigl": [0.92, 0.92]}
  reproduced, verdict = sparse_mlp.judge(_payload(accuracy))
  assert reproduced == "yes" and "2 of the 2 orderings" in verdict
  assert "RigL 95.00 ± 1.41 %, SET 90.00 ± 0.00 %, static 71.00 ± 1.41 %" in verdict
  assert "(dense 99.00 ± 0.00 %)" in verdict
  # RigL ahead of SET by 1 point with seed stds of 1.41 + 1.41: inside the noise.
  noisy = {**accuracy, "rigl": [0.90, 0.92], "set": [0.89, 0.91]}
  assert sparse_mlp.judge(_payload(noisy))[0] == "partly"
  reversed_ = {**accuracy, "rigl": [0.60, 0.60], "set": [0.65, 0.65]}  # static 71 > SET > RigL
  assert sparse_mlp.judge(_payload(reversed_))[0] == "no"
