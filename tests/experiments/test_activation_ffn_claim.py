"""The activation-FFN claim's table and verdict on hand-written runs (its full run trains three
LMs, too slow for the suite)."""
from experiments.claims import activation_ffn


def _runs(topk_bpb: float, predicted_bpb: float) -> dict:
  return {"runs": [
      {"arm": "dense", "seed": 0, "eval_bpb": 2.1434, "active_fraction": 1.0, "recall": None,
       "steps": 400},
      {"arm": "topk", "seed": 0, "eval_bpb": topk_bpb, "active_fraction": 0.0996, "recall": None,
       "steps": 400},
      {"arm": "predicted", "seed": 0, "eval_bpb": predicted_bpb, "active_fraction": 0.0996,
       "recall": 0.61, "steps": 400}]}


def test_table_has_a_row_per_arm():
  lines = activation_ffn.table(_runs(2.15, 2.2)).splitlines()
  assert lines[2] == "| `dense` | 2.143 | 1.000 | - | 400 |"
  assert lines[4] == "| `predicted` | 2.200 | 0.100 | 0.61 | 400 |"


def test_judge_follows_the_cost_threshold():
  assert activation_ffn.judge(_runs(2.15, 2.16))[0] == "yes"
  reproduced, verdict = activation_ffn.judge(_runs(2.15, 2.33))
  assert reproduced == "partly" and "+0.187" in verdict
  assert activation_ffn.judge(_runs(2.3, 2.33))[0] == "no"
