"""The SAE-on-the-LM claim's table and judge on hand cases."""
from experiments.claims import sae_lm


def _payload(topk: dict, relu: dict, seeds: int = 1) -> dict:
  """Rows for the TopK and ReLU architectures: metric -> per-seed values (or one value)."""
  rows = []
  for name, metrics in ((sae_lm.TOPK, topk), (sae_lm.RELU, relu)):
    for seed in range(seeds):
      values = {k: v[seed] if isinstance(v, list) else v for k, v in metrics.items()}
      rows.append({"name": name, "dictionary": {}, "seed": seed, "eval/dead_fraction": 0.1,
                   "eval/kl": 0.05, "steps": 10, "wall_s": 1.0, **values})
  return {"rows": rows, "lm_workdir": "hand"}


def test_judge_yes_at_about_equal_l0():
  reproduced, verdict = sae_lm.judge(_payload(
      {"eval/fvu": [0.05, 0.06], "eval/ce_recovered": 0.99, "eval/l0": 16.0},
      {"eval/fvu": [0.14, 0.15], "eval/ce_recovered": 0.95, "eval/l0": 14.0}, seeds=2))
  assert reproduced == "yes"
  assert "TopK FVU 0.055 and CE recovered 0.990 at L0 16.0" in verdict
  assert "at L0 14.0 (2 seed(s))." in verdict


def test_judge_partly_when_relu_is_much_sparser_and_no_when_it_reconstructs_better():
  topk = {"eval/fvu": 0.05, "eval/ce_recovered": 0.99, "eval/l0": 16.0}
  reproduced, verdict = sae_lm.judge(_payload(
      topk, {"eval/fvu": 0.15, "eval/ce_recovered": 0.95, "eval/l0": 11.7}))
  assert reproduced == "partly" and "not an equal-L0 comparison" in verdict
  assert sae_lm.judge(_payload(
      topk, {"eval/fvu": 0.04, "eval/ce_recovered": 0.995, "eval/l0": 16.0}))[0] == "no"


def test_table_cells():
  text = sae_lm.table(_payload({"eval/fvu": 0.05, "eval/ce_recovered": 0.99, "eval/l0": 16.0},
                               {"eval/fvu": 0.15, "eval/ce_recovered": 0.95, "eval/l0": 11.7}))
  assert f"| {sae_lm.TOPK} | 0.050 | 16.0 | 10.0 | 0.990 | 0.050 |" in text
