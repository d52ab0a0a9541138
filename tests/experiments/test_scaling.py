"""experiments.scaling: the run reader on fabricated workdirs (params counted by hand), the CLI's
tables and JSON, and the report's fit on synthetic law points."""
import itertools
import json

import numpy as np
import pytest

from experiments import scaling
from experiments.configs import base



# d_model 8, 1 layer, vocab 258: embedding 258*8, 3 norms of 8, wq/wk/wv/wo 8*8, wi/wo 8*d_ff.
def hand_total(d_ff):
  return 258 * 8 + 3 * 8 + 4 * 8 * 8 + 2 * 8 * d_ff


def write_run(path, d_ff, densities=None, loss=2.0, task="lm"):
  config = base.get_config()
  config.task = task
  config.model.update(d_model=8, num_layers=1, num_heads=2, d_ff=d_ff, max_len=16)
  config.train.update(seq_len=16, batch_size=4)
  config.sparsity.enabled = densities is not None
  config.sparsity.updater.name = "rigl" if densities else "static"
  path.mkdir()
  (path / "config.json").write_text(config.to_json())
  logged = {f"density/{k}": v for k, v in (densities or {}).items()}
  if densities:
    logged["density/global"] = 0.5
  records = [{"step": 10, "train/loss": 3.0, **logged},
             {"step": 20, "eval/loss": loss, **logged},
             {"step": 25, "train/loss": 1.0, **{k: 0.01 for k in logged}}]  # after the last eval
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_read_run_counts_nonzero_params_and_tokens(tmp_path):
  run = write_run(tmp_path / "s", 16, {"layer_0/ffn/wi": 0.25, "layer_0/ffn/wo": 0.5}, loss=1.7)
  row = scaling.read_run(run)
  nonzero = hand_total(16) - 128 * 0.75 - 128 * 0.5
  assert row["total_params"] == hand_total(16) == 2600
  assert row["nonzero_params"] == pytest.approx(nonzero)
  assert row["sparsity"] == pytest.approx(1 - nonzero / 2600)
  assert row["tokens"] == 20 * 4 * 16 and row["flops"] == 6 * 2600 * 1280
  assert row["loss"] == 1.7 and row["method"] == "rigl" and row["name"] == "s"


def test_read_run_rejects_other_tasks_and_runs_without_eval(tmp_path):
  with pytest.raises(ValueError, match="only 'lm' runs"):
    scaling.read_run(write_run(tmp_path / "c", 16, task="classify"))
  run = write_run(tmp_path / "n", 16)
  (tmp_path / "n" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
  with pytest.raises(ValueError, match="no eval/loss"):
    scaling.read_run(run)


def test_cli_compares_sparse_with_dense(tmp_path, capsys):
  small = write_run(tmp_path / "small", 8, loss=2.0)  # 2472 params
  big = write_run(tmp_path / "big", 16, loss=1.5)  # 2600 params
  sparse = write_run(tmp_path / "sp", 16, {"layer_0/ffn/wi": 0.75, "layer_0/ffn/wo": 0.75},
                     loss=1.6)  # 2600 - 64 = 2536 non-zero
  out = tmp_path / "r.json"
  assert scaling.main(["--runs", small, big, sparse, "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "no fit: 3 runs" in printed and "sparse vs dense at equal training FLOPs" in printed
  results = json.loads(out.read_text())
  at_n, = results["vs_dense_at_nonzero_params"]
  t = np.log(2536 / 2472) / np.log(2600 / 2472)
  expected = np.exp((1 - t) * np.log(2.0) + t * np.log(1.5))
  assert at_n["dense_loss"] == pytest.approx(expected) and at_n["delta"] == pytest.approx(
      1.6 - expected)
  at_flops, = results["vs_dense_at_flops"]  # same tokens and total params as "big"
  assert at_flops["dense_loss"] == pytest.approx(1.5)


def test_cli_reports_a_bad_budget(tmp_path, capsys):
  assert scaling.main(["--runs", write_run(tmp_path / "d", 8), "--budget", "1e6"]) == 1
  assert "must be N:C" in capsys.readouterr().err


def test_report_fits_and_tabulates_budgets():
  p = {"a_S": 30.0, "b_S": 1.2, "c_S": 5.0, "b_N": 0.3, "a_D": 2e5, "b_D": 0.4, "c": 1.2}
  rows = []
  for s, n, d in itertools.product((0.0, 0.5, 0.75, 0.875), (1e5, 1e6, 3e6), (1e7, 1e8, 1e9)):
    loss = (p["a_S"] * (1 - s) ** p["b_S"] + p["c_S"]) / n ** p["b_N"] + (p["a_D"] / d) ** p[
        "b_D"] + p["c"]
    rows.append({"name": "r", "method": "m", "density": 1 - s, "sparsity": s, "total_params":
                 n / (1 - s), "nonzero_params": n, "tokens": d, "flops": 6 * n / (1 - s) * d,
                 "loss": loss})
  text, results = scaling.report(rows, [(1e6, 1e16), (1e6, 1e18)])
  assert "## optimal sparsity per budget" in text and results["fit"]["rms_log_residual"] < 1e-6
  assert results["fit"]["params"]["b_N"] == pytest.approx(0.3, rel=1e-3)
  low, high = results["optimal_sparsity"]
  assert low["loss"] <= low["dense_loss"] and high["sparsity"] > low["sparsity"]
