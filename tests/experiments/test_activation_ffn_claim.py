"""The activation-FFN claim's metric summary and table on hand-written records (its --fast run
trains three LMs, too slow for the suite; run it by hand)."""
import pytest

from experiments.claims import activation_ffn


def test_final_metrics_average_layers_of_the_last_records():
  records = [
      {"step": 1, "train/loss": 5.0, "train/layer_0/ffn/recall": 0.0},
      {"step": 2, "train/loss": 4.0, "train/layer_0/ffn/active_fraction": 0.1,
       "train/layer_1/ffn/active_fraction": 0.2, "train/layer_0/ffn/recall": 0.5,
       "train/layer_1/ffn/recall": 0.7, "train/layer_1/attention/recall": 9.0},
      {"step": 2, "eval/bpb": 2.5},
  ]
  row = activation_ffn.final_metrics(records)
  assert row == {"eval/bpb": 2.5, "steps": 2, "active_fraction": pytest.approx(0.15),
                 "recall": pytest.approx(0.6)}
  dense = activation_ffn.final_metrics([{"step": 3, "train/loss": 1.0}, {"step": 3, "eval/bpb": 2}])
  assert dense["active_fraction"] == 1.0 and dense["recall"] is None


def test_table_has_a_row_per_run():
  rows = [{"name": "dense", "eval/bpb": 2.1434, "active_fraction": 1.0, "recall": None,
           "steps": 400},
          {"name": "predicted", "eval/bpb": 2.2, "active_fraction": 0.0996, "recall": 0.61,
           "steps": 400}]
  lines = activation_ffn.table(rows).splitlines()
  assert lines[2] == "| dense | 2.143 | 1.000 | - | 400 |"
  assert lines[3] == "| predicted | 2.200 | 0.100 | 0.610 | 400 |"
