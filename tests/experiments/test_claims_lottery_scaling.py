"""The layer_lottery and scaling_law claims on hand-written payloads (their runs train LMs: too
slow here), the random block choice, and the checkpoint the warm start reads."""
import itertools

import numpy as np
import pytest

from experiments import layer_drop
from experiments import warm_start
from experiments.claims import layer_lottery
from experiments.claims import scaling_law


def _lottery(bpb: dict[str, list[float]], snip_dropped=(2, 3)) -> dict:
  runs = []
  for arm, values in bpb.items():
    for seed, value in enumerate(values):
      runs.append({"arm": arm, "seed": seed, "eval_bpb": value,
                   "blocks": 4 if arm == "full_4" else 2,
                   "dropped": {"snip_drop": list(snip_dropped),
                               "random_drop": [0, 2]}.get(arm, [])})
  return {"runs": runs, "deep": 4, "shallow": 2, "score": "snip"}


def test_layer_lottery_yes_when_the_ticket_matches_the_full_lm_and_beats_the_controls():
  payload = _lottery({"full_4": [3.00, 3.01, 3.02], "snip_drop": [3.005, 3.01, 3.015],
                      "random_drop": [3.10, 3.11, 3.12], "scratch_2": [3.08, 3.09, 3.10]},
                     snip_dropped=(0, 1))
  reproduced, verdict = layer_lottery.judge(payload)
  assert reproduced == "yes", verdict
  assert "3.010 ± 0.005" in verdict and "100%" in verdict and "path-keyed" not in verdict
  # kept = (3.09 - 3.01) / (3.09 - 3.01) = 1; random: (3.09 - 3.11) / 0.08 = -0.25
  assert layer_lottery.depth_gain_kept(payload, "snip_drop") == pytest.approx(1.0)
  assert layer_lottery.depth_gain_kept(payload, "random_drop") == pytest.approx(-0.25)
  assert "| `random_drop` | 2 | 1x | 02 02 02 | 3.110 ± 0.010 | -25% |" in (
      layer_lottery.table(payload))


def test_layer_lottery_no_when_the_ticket_is_the_shallow_lm_and_loses_to_the_full_one():
  shallow = [3.10, 3.12, 3.14]
  payload = _lottery({"full_4": [3.00, 3.01, 3.02], "snip_drop": shallow,
                      "random_drop": [3.11, 3.12, 3.13], "scratch_2": shallow})
  reproduced, verdict = layer_lottery.judge(payload)
  assert reproduced == "no", verdict
  assert "3 of 3 seeds" in verdict and "0%" in verdict
  # the ticket equal to scratch, but clearly below random: one control beaten -> partly
  payload = _lottery({"full_4": [3.00, 3.01, 3.02], "snip_drop": shallow,
                      "random_drop": [3.20, 3.21, 3.22], "scratch_2": shallow})
  assert layer_lottery.judge(payload)[0] == "partly"


def test_random_blocks_draws_other_subsets_and_never_the_avoided_one():
  allowed = set(itertools.combinations(range(4), 2)) - {(2, 3)}
  drawn = {layer_drop.random_blocks(4, 2, seed, avoid=(3, 2)) for seed in range(6)}
  assert drawn <= allowed and len(drawn) >= 3
  assert layer_drop.random_blocks(4, 2, 7) == layer_drop.random_blocks(4, 2, 7)
  with pytest.raises(ValueError, match="num_drop"):
    layer_drop.random_blocks(2, 2, 0)
  with pytest.raises(ValueError, match="other than"):
    layer_drop.random_blocks(1, 0, 0, avoid=())


def test_saved_params_are_what_the_warm_start_reads(tmp_path):
  params = {"params": {"embed": np.arange(6, dtype=np.float32).reshape(2, 3),
                       "layer_0": {"w": np.ones((3,), np.float32)}}}
  layer_drop.save_params(str(tmp_path), params, {"dropped": [1]})
  source, step = warm_start.open_source(type("Init", (), {"from_workdir": str(tmp_path)}))
  loaded = source.restore_params(step)
  assert step == 0
  np.testing.assert_array_equal(loaded["params"]["embed"], params["params"]["embed"])
  np.testing.assert_array_equal(loaded["params"]["layer_0"]["w"], np.ones(3))


def _scaling(rms: float, optima: list[float]) -> dict:
  runs = [{"width": 32, "ffn_sparsity": s, "steps": 100, "seed": 0, "sparsity": s / 2,
           "nonzero_params": 1000.0 * (1 - s / 2), "tokens": 102400, "loss": 2.0 + s,
           "predicted_loss": 2.01 + s} for s in (0.0, 0.5)]
  return {"runs": runs,
          "fit": {"params": dict(zip(("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c"),
                                     (1.0, 1.0, 0.0, 0.5, 1.0, 0.5, 1.0))),
                  "rms_log_residual": rms},
          "optimal_sparsity": [{"nonzero_params": 1000.0, "flops": 10.0 ** k, "sparsity": s,
                                "tokens": 1e5, "loss": 2.0, "dense_loss": 2.1}
                               for k, s in zip((9, 8, 10, 11), optima)]}


def test_scaling_law_yes_when_it_fits_and_the_optimum_grows_with_the_budget():
  payload = _scaling(0.01, [0.3, 0.1, 0.5, 0.5])  # by FLOPs 1e8..1e11: 0.1, 0.3, 0.5, 0.5
  assert scaling_law.growth(payload) == (True, [0.1, 0.3, 0.5, 0.5])
  reproduced, verdict = scaling_law.judge(payload)
  assert reproduced == "yes" and "0.0100" in verdict and "0.10, 0.30, 0.50, 0.50" in verdict
  table = scaling_law.table(payload)
  assert "| 32 | 0.50 | 100 | 0.250 | 750 | 102,400 | 2.5000 | 2.5100 |" in table
  assert "| 1,000 | 1e+08 | 0.100 | 1e+05 | 2.0000 | 2.1000 |" in table


def test_scaling_law_no_when_the_fit_is_poor_and_the_optimum_falls():
  payload = _scaling(0.05, [0.4, 0.5, 0.3, 0.2])
  assert scaling_law.growth(payload)[0] is False
  assert scaling_law.judge(payload)[0] == "no"
  assert scaling_law.judge(_scaling(0.05, [0.3, 0.1, 0.5, 0.5]))[0] == "partly"
  assert scaling_law.judge(_scaling(0.01, [0.1, 0.1, 0.12, 0.12]))[0] == "partly"  # +0.02 only


def test_sweep_config_sets_width_masks_and_schedule():
  sparse = scaling_law.sweep_config(32, 0.75, 100, seed=3, fast=False)
  assert (sparse.seed, sparse.model.d_model, sparse.model.d_ff) == (3, 32, 128)
  assert sparse.sparsity.enabled and sparse.sparsity.density == 0.25
  assert (sparse.sparsity.schedule.end, sparse.sparsity.schedule.update_every) == (75, 12)
  assert (sparse.train.num_steps, sparse.train.eval_every, sparse.model.num_layers) == (100, 100, 2)
  dense = scaling_law.sweep_config(64, 0.0, 400, seed=0, fast=False)
  assert not dense.sparsity.enabled and dense.model.d_model == 64
  runs = [{"width": w, "ffn_sparsity": s, "flops": f, "nonzero_params": n}
          for w, s, f, n in ((32, 0.0, 9.0, 10.0), (64, 0.0, 4.0, 20.0), (64, 0.0, 8.0, 20.0),
                             (64, 0.5, 99.0, 15.0))]
  assert scaling_law.budgets(runs) == [(20.0, 8.0), (20.0, 80.0), (20.0, 800.0), (20.0, 8000.0)]
