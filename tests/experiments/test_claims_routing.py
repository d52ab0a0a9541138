"""The routing claims' arms, orderings, verdicts and tables on hand-made payloads (no training)."""
import pytest

from experiments.claims import aux_free_balance
from experiments.claims import avg_k
from experiments.claims import hash_vs_switch


def _runs(bpb: dict[str, list[float]], load: dict[str, list[float | None]] | None = None):
  """Rows {"arm", "seed", "eval_bpb", "load_max_over_mean", "wall_s"} for seeds 0, 1, 2."""
  return [{"arm": arm, "seed": seed, "eval_bpb": value, "wall_s": 30.0,
           "load_max_over_mean": (load or {}).get(arm, [1.5] * 3)[seed]}
          for arm, values in bpb.items() for seed, value in enumerate(values)]


@pytest.mark.parametrize("a, b, expected", [
    ([1.0, 2.0], [2.5, 3.0], "better"),  # disjoint ranges, a below
    ([2.5, 3.0], [1.0, 2.0], "worse"),
    ([1.0, 3.0], [2.0, 2.5], "tie"),  # a's range contains b's
    ([1.0, 2.0], [2.0, 3.0], "tie"),  # touching ranges are not separated
])
def test_compare_orders_by_disjoint_seed_ranges(a, b, expected):
  assert hash_vs_switch.compare(a, b) == expected


def test_arms_route_as_the_papers_do():
  switch = hash_vs_switch.switch_config().model.ffn
  assert (switch.name, switch.router, switch.k, switch.expert) == ("moe", "top_k", 1, "ffn")
  assert dict(switch.router_kwargs) == {"order": "softmax_then_topk", "renormalize": False}
  assert (switch.load_balance_weight, switch.z_loss_weight, switch.bias_update_rate) == (
      1e-2, 0.0, 0.0)
  hashed = hash_vs_switch.hash_config().model.ffn
  assert (hashed.name, hashed.hash_table, hashed.expert, hashed.num_experts) == (
      "hash_moe", "balanced", "ffn", 8)
  avg = avg_k.avg_k_config().model.ffn
  assert (avg.router, avg.k, dict(avg.router_kwargs), avg.load_balance_weight) == (
      "avg_k", 1, {}, 0.0)
  balancing = {name: factory().model.ffn for name, factory in aux_free_balance.arm_configs()}
  assert {name: (f.k, f.load_balance_weight, f.bias_update_rate)
          for name, f in balancing.items()} == {
              "no balancing": (2, 0.0, 0.0), "LB loss": (2, 1e-2, 0.0),
              "aux-free bias": (2, 0.0, aux_free_balance.BIAS_RATE)}


def test_hash_vs_switch_yes_when_hash_ties_switch_and_both_beat_dense():
  payload = {"runs": _runs({"dense": [3.0, 3.1, 3.05], "switch": [2.8, 2.85, 2.9],
                            "hash": [2.82, 2.88, 2.95]},
                           {"dense": [None] * 3, "switch": [1.2] * 3, "hash": [2.4] * 3})}
  reproduced, verdict = hash_vs_switch.judge(payload)
  assert reproduced == "yes"
  assert "hash 2.883 ± 0.065" in verdict and "hash tie" in verdict
  table = hash_vs_switch.table(payload)
  assert "| dense | 3.050 ± 0.050 | - | 30 ± 0 | 3 |" in table
  assert "| hash | 2.883 ± 0.065 | 2.40 ± 0.00 | 30 ± 0 | 3 |" in table


def test_hash_vs_switch_no_when_hash_is_worse_on_every_seed():
  payload = {"runs": _runs({"dense": [3.0, 3.1, 3.05], "switch": [2.8, 2.85, 2.9],
                            "hash": [2.95, 2.97, 2.99]})}
  assert hash_vs_switch.judge(payload)[0] == "no"


def test_hash_vs_switch_partly_when_switch_ties_dense():
  payload = {"runs": _runs({"dense": [3.0, 3.1, 3.05], "switch": [3.02, 3.06, 3.12],
                            "hash": [2.7, 2.8, 2.75]})}
  reproduced, verdict = hash_vs_switch.judge(payload)
  assert reproduced == "partly" and "Switch tie, hash better" in verdict


def test_avg_k_yes_below_both_and_no_above_one():
  win = {"avg_k": [2.6, 2.62, 2.64], "switch": [2.7, 2.75, 2.8], "hash": [2.66, 2.7, 2.72]}
  assert avg_k.judge({"runs": _runs(win)})[0] == "yes"
  lose = dict(win, avg_k=[2.73, 2.74, 2.75])  # ties Switch, above hash on every seed
  reproduced, verdict = avg_k.judge({"runs": _runs(lose)})
  assert reproduced == "no" and "(tie)" in verdict and "(worse)" in verdict
  tie = dict(win, avg_k=[2.65, 2.7, 2.75])
  assert avg_k.judge({"runs": _runs(tie)})[0] == "partly"


def _balance_payload(bpb, load):
  runs = _runs(bpb, load)
  for row in runs:
    row["max_vio"] = row["load_max_over_mean"] - 1.0
  return {"runs": runs, "bias_rate": aux_free_balance.BIAS_RATE}


def test_aux_free_yes_when_balance_better_and_loss_ties():
  payload = _balance_payload(
      {"no balancing": [2.9, 2.95, 3.0], "LB loss": [2.9, 2.92, 2.94],
       "aux-free bias": [2.89, 2.93, 2.95]},
      {"no balancing": [2.0, 2.2, 2.4], "LB loss": [1.3, 1.35, 1.4],
       "aux-free bias": [1.0, 1.1, 1.2]})
  reproduced, verdict = aux_free_balance.judge(payload)
  assert reproduced == "yes"
  assert "MaxVio aux-free 0.10 ± 0.10 vs LB loss 0.35 ± 0.05 (better)" in verdict
  assert "| aux-free bias | 2.923 ± 0.031 | 1.10 ± 0.10 | 0.10 ± 0.10 | 30 ± 0 | 3 |" in (
      aux_free_balance.table(payload))


def test_aux_free_no_when_loss_is_worse_and_partly_when_all_tie():
  bpb = {"no balancing": [2.9, 2.95, 3.0], "LB loss": [2.9, 2.92, 2.94],
         "aux-free bias": [2.96, 2.98, 3.0]}
  load = {"no balancing": [2.0] * 3, "LB loss": [1.3, 1.35, 1.4], "aux-free bias": [1.0, 1.1, 1.2]}
  assert aux_free_balance.judge(_balance_payload(bpb, load))[0] == "no"
  bpb["aux-free bias"] = [2.91, 2.92, 2.93]
  load["aux-free bias"] = [1.32, 1.36, 1.38]
  assert aux_free_balance.judge(_balance_payload(bpb, load))[0] == "partly"
