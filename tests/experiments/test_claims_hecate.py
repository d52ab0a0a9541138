"""The hecate claim's judge and table on hand-made payloads (the claim itself is not run)."""
import numpy as np

from experiments.claims import hecate


def _row(case, seed, m_local, local_bytes, dense_bytes=14336, diff=1e-7):
  return {"case": case, "pattern": "router", "tokens": 64, "seed": seed, "experts": 8,
          "active": m_local, "m_local": m_local, "m_load": 3, "dense_bytes": dense_bytes,
          "local_bytes": local_bytes, "load_bytes": 9000, "ep_balance": 2.0,
          "load_balance": 1.25, "max_abs_diff": diff, "dense_s": 0.02,
          "fssdp_local_s": 0.01, "fssdp_load_s": 0.03}


def test_judge_yes_when_fewer_bytes_iff_fewer_experts():
  # 4 of 8 experts: 2 * 7 * 4 * 1024 / 8 = 7168 bytes, half the all-gather's 14336
  payload = {"rows": [_row("few", 0, 4, 7168), _row("few", 1, 4, 7168),
                      _row("all", 0, 8, 14336)]}
  reproduced, verdict = hecate.judge(payload)
  assert reproduced == "yes"
  assert "all 2 runs" in verdict and "few 0.50" in verdict and "all 1.00" in verdict


def test_judge_no_when_bytes_not_saved_or_outputs_differ():
  assert hecate.judge({"rows": [_row("few", 0, 4, 14336)]})[0] == "no"  # nothing saved
  assert hecate.judge({"rows": [_row("all", 0, 8, 7168)]})[0] == "no"  # all used, fewer?
  assert hecate.judge({"rows": [_row("few", 0, 4, 7168, diff=1e-2)]})[0] == "no"


def test_table_cells():
  payload = {"rows": [_row("few", 0, 4, 7168), _row("few", 1, 4, 7168)]}
  lines = hecate.table(payload).splitlines()
  assert len(lines) == 3
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert cells[0] == "few"
  assert cells[5] == "0.50 ± 0.00"  # FSSDP / all-gather bytes
  assert cells[9] == "0.50 ± 0.00"  # step-time ratio 0.01 / 0.02


def test_balance_is_max_over_mean():
  assert hecate.balance(np.array([4, 2, 2, 0])) == 2.0
