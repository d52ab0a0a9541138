"""The claims runner writes a record, a table and a plot per claim; the README's results section
is what the stored records say."""
import dataclasses
import json

import pytest

from experiments import claims
from experiments.claims import __main__ as runner
from experiments.claims import readme


def _fake_claim(verdict: str = "yes") -> claims.Claim:
  def run(seeds, fast):
    return {"runs": [{"arm": "a", "seed": s, "score": 1.0 + s} for s in seeds], "fast": fast}

  def table(payload):
    groups = claims.group(payload["runs"], "arm", "score")
    return claims.markdown_table(["arm", "score"], [[a, claims.fmt(v)] for a, v in groups.items()])

  return claims.Claim(
      name="default_lm", title="t", source="s", statement="st", setup="su", expected="e",
      run=run, table=table, judge=lambda payload: (verdict, "because"),
      plot=lambda payload, path: claims.bar_plot(
          path, claims.group(payload["runs"], "arm", "score"), "score", "t"))


def test_mean_std_and_fmt_match_a_hand_worked_case():
  assert claims.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
  assert claims.mean_std([4.0]) == (4.0, 0.0)
  assert claims.fmt([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00"
  assert claims.fmt([0.5], 1) == "0.5"


def test_markdown_table_layout():
  assert claims.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_runner_writes_json_table_and_png(tmp_path, monkeypatch):
  monkeypatch.setattr(claims, "load", lambda name: _fake_claim())
  assert runner.main(["default_lm", "--seeds", "3", "--out", str(tmp_path)]) == 0
  record = json.loads((tmp_path / "default_lm.json").read_text())
  assert record["seeds"] == [0, 1, 2] and record["fast"] is False
  assert record["command"] == "python -m experiments.claims default_lm --seeds 3"
  assert record["reproduced"] == "yes" and record["verdict"] == "because"
  assert [r["score"] for r in record["payload"]["runs"]] == [1.0, 2.0, 3.0]
  assert "| a | 2.000 ± 1.000 |" in (tmp_path / "default_lm.md").read_text()
  assert (tmp_path / "default_lm.png").read_bytes()[:4] == b"\x89PNG"


def test_fast_runs_one_seed_unless_told(tmp_path, monkeypatch):
  monkeypatch.setattr(claims, "load", lambda name: _fake_claim())
  runner.main(["default_lm", "--fast", "--out", str(tmp_path)])
  record = json.loads((tmp_path / "default_lm.json").read_text())
  assert record["seeds"] == [0] and record["payload"]["fast"] is True
  assert record["command"] == "python -m experiments.claims default_lm --seeds 1 --fast"
  runner.main(["default_lm", "--fast", "--seeds", "2", "--out", str(tmp_path)])
  assert json.loads((tmp_path / "default_lm.json").read_text())["seeds"] == [0, 1]


def test_bad_verdict_is_an_error():
  with pytest.raises(ValueError, match="'maybe'"):
    claims.envelope(_fake_claim("maybe"), {"runs": []}, [0], False, 1.0, "2026-01-01")


def test_unknown_claim_is_named(capsys):
  with pytest.raises(SystemExit):
    runner.main(["no_such_claim"])
  assert "no_such_claim" in capsys.readouterr().err


def test_rewrite_replaces_only_the_generated_block():
  text = f"intro\n{readme.BEGIN}\nold\n{readme.END}\noutro\n"
  assert readme.rewrite(text, "new\n") == f"intro\n{readme.BEGIN}\nnew\n{readme.END}\noutro\n"
  with pytest.raises(ValueError, match="markers"):
    readme.rewrite("no markers", "new\n")


def test_every_claim_is_registered_has_its_text_and_a_stored_record():
  for name in claims.NAMES:
    claim = claims.load(name)
    assert claim.name == name and claim.source and claim.statement and claim.expected
    record = claims.load_result(name)
    assert record["name"] == name and not record["fast"], f"{name}: no full-run record"


def test_a_failing_claim_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
  def load(name):
    claim = _fake_claim()
    if name == "default_lm":
      def run(seeds, fast):
        raise RuntimeError("boom")
      return dataclasses.replace(claim, run=run)
    return dataclasses.replace(claim, name=name)

  monkeypatch.setattr(claims, "load", load)
  assert runner.main(["default_lm", "sparse_mlp", "--out", str(tmp_path)]) == 1
  assert "failed: default_lm" in capsys.readouterr().err
  assert (tmp_path / "sparse_mlp.json").exists() and not (tmp_path / "default_lm.json").exists()
