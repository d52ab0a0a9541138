"""The memory-finetuning claim's equal-learning comparison, table and judge on hand cases."""
import pytest

from experiments.claims import memory_finetune as claim

BEFORE = {"new_bpb": 4.0, "background_bpb": 3.0}


def _rows(seed: int, forgetting: dict[str, float]) -> list[dict]:
  """Per method two learning rates: (facts 3.0, validation +0.1) and (facts 1.0, +forgetting)."""
  return [{"method": m, "lr": lr, "seed": seed, "trained_params": 10, "new_bpb": new,
           "background_bpb": BEFORE["background_bpb"] + extra}
          for m, value in forgetting.items()
          for lr, new, extra in ((1e-3, 3.0, 0.1), (1e-2, 1.0, value))]


def _payload(per_seed: list[dict[str, float]]) -> dict:
  rows = [r for seed, f in enumerate(per_seed) for r in _rows(seed, f)]
  return {"config": {}, "before": [{"seed": s, **BEFORE} for s in range(len(per_seed))],
          "slots": [], "rows": rows}


def test_forgetting_at_equal_learning_hand_case():
  rows = [{"method": "full", "new_bpb": 0.5, "background_bpb": 7.0},
          {"method": "full", "new_bpb": 2.5, "background_bpb": 4.0},
          {"method": "sparse_memory", "new_bpb": 2.0, "background_bpb": 3.5},
          {"method": "sparse_memory", "new_bpb": 3.5, "background_bpb": 3.1}]
  # Best facts bpb: full 0.5, sparse 2.0 -> L = 2.0; full's only run <= 2.0 forgot +4.0.
  level, forgetting = claim.forgetting_at_equal_learning(rows, BEFORE)
  assert level == 2.0
  assert forgetting == pytest.approx({"full": 4.0, "sparse_memory": 0.5})


def test_judge_yes_when_sparse_forgets_least_in_every_seed():
  reproduced, verdict = claim.judge(_payload([{"full": 4.0, "lora": 2.0, "sparse_memory": 0.5},
                                              {"full": 5.0, "lora": 2.2, "sparse_memory": 0.7}]))
  assert reproduced == "yes"
  assert "facts bpb <= 1.000 ± 0.000, 2 seed(s)" in verdict
  assert "+0.600 ± 0.141" in verdict and "+4.500 ± 0.707" in verdict


def test_judge_partly_and_no():
  inside = [{"full": 4.0, "lora": 0.4, "sparse_memory": 0.5},
            {"full": 4.0, "lora": 1.6, "sparse_memory": 0.5}]
  assert claim.judge(_payload(inside))[0] == "partly"  # beats LoRA on average, not per seed
  assert claim.judge(_payload([{"full": 1.0, "lora": 1.0, "sparse_memory": 2.0}]))[0] == "no"


def test_table_shows_changes_from_before():
  text = claim.table(_payload([{"full": 4.0, "lora": 2.0, "sparse_memory": 0.5}]))
  assert "| full | 10 | 0.01 | 1.000 (-3.000) | 7.000 (+4.000) |" in text
  assert text.startswith("Before finetuning: facts 4.000 bpb, stdlib validation 3.000 bpb.")
  assert "full +4.000, lora +2.000, sparse_memory +0.500" in text
