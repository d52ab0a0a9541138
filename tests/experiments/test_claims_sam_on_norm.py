"""The SAM-on-norm claim's judge and table on hand-made payloads."""
from experiments.claims import sam_on_norm


def _payload(bpb: dict[str, list[float]]) -> dict:
  runs = [{"arm": arm, "seed": s, "eval_bpb": v, "train_loss": 2.0 + s, "wall_s": 10.0 * (s + 1)}
          for arm, values in bpb.items() for s, v in enumerate(values)]
  return {"runs": runs, "density": 0.1}


def test_judge_yes_when_sam_on_beats_adamw_on_every_seed_and_matches_full_sam():
  reproduced, verdict = sam_on_norm.judge(_payload({
      "adamw": [3.50, 3.52], "sam_on_0.1": [3.45, 3.46], "sam_on_0.5": [3.40, 3.41],
      "sam_all_0.05": [3.42, 3.43]}))
  assert reproduced == "yes"
  assert verdict.startswith("Eval bpb best SAM-ON (sam_on_0.5) 3.405 ± 0.007 vs AdamW "
                            "3.510 ± 0.014 (-0.105): better")
  assert "SAM on all weights 3.425 ± 0.007, SAM-ON within 0.03 of it or below." in verdict


def test_judge_partly_inside_the_spread_or_far_behind_full_sam():
  inside = {"adamw": [3.50, 3.54], "sam_on_0.1": [3.49, 3.51], "sam_all_0.05": [3.50, 3.50]}
  assert sam_on_norm.judge(_payload(inside))[0] == "partly"
  behind = {"adamw": [3.50, 3.50], "sam_on_0.1": [3.40, 3.40], "sam_all_0.05": [3.30, 3.30]}
  reproduced, verdict = sam_on_norm.judge(_payload(behind))
  assert reproduced == "partly" and "SAM-ON beyond 0.03 of it" in verdict


def test_judge_no_when_sam_on_is_not_below_adamw():
  reproduced, verdict = sam_on_norm.judge(_payload({
      "adamw": [3.50, 3.52], "sam_on_0.1": [3.51, 3.53], "sam_on_0.5": [3.55, 3.56],
      "sam_all_0.05": [3.55, 3.55]}))
  assert reproduced == "no"
  assert "(sam_on_0.1) 3.520 ± 0.014 vs AdamW 3.510 ± 0.014 (+0.010): tie" in verdict


def test_table_cells():
  text = sam_on_norm.table(_payload({"adamw": [3.50, 3.52], "sam_on_0.5": [3.40, 3.41],
                                     "sam_all_0.05": [3.42, 3.43]}))
  assert "| adamw | 3.510 ± 0.014 | +0.000 | 2.500 ± 0.707 | 15 ± 7 | 2 |" in text
  assert "| sam_on_0.5 | 3.405 ± 0.007 | -0.105 |" in text
