"""Verdicts of the LM claims on hand-written payloads (their runs train LMs: too slow here)."""
from experiments.claims import decode_budget
from experiments.claims import lm_neurons
from experiments.claims import sparse_attention


def _attention_runs(bpb: dict[str, float]) -> dict:
  return {"runs": [{"arm": arm, "seed": 0, "eval_bpb": value, "steps": 400,
                    "attended_fraction": 0.5} for arm, value in bpb.items()]}


def test_sparse_attention_counts_patterns_within_the_tie_margin():
  arms = [key for key, _, _ in sparse_attention.ATTENTIONS]
  bpb = {arm: 2.10 for arm in arms}
  bpb.update(dense=2.143, entmax=2.3)
  reproduced, verdict = sparse_attention.judge(_attention_runs(bpb))
  assert reproduced == "yes" and "6 of 6" in verdict
  bpb["strided"] = 2.2  # 0.057 worse than dense: outside the margin
  assert sparse_attention.judge(_attention_runs(bpb))[0] == "partly"
  assert sparse_attention.judge(_attention_runs({**{a: 2.3 for a in arms}, "dense": 2.1}))[0] == "no"
  assert "| dense | 2.143 | 0.500 | 400 |" in sparse_attention.table(_attention_runs(bpb))


def _decode_rows(delta_topk: float, agreement: float) -> dict:
  rows = [{"policy": "full", "budget": 128, "attended_fraction": 1.0, "bpb": 2.2,
           "delta_bpb": 0.0, "top1_agreement": 1.0}]
  for policy in ("topk", "pages (Quest, P=8)"):
    for budget in (8, 16):
      rows.append({"policy": policy, "budget": budget, "attended_fraction": 0.3,
                   "bpb": 2.2 + delta_topk, "delta_bpb": delta_topk,
                   "top1_agreement": agreement})
  return {"rows": rows, "windows": 64}


def test_decode_budget_judges_top_k_at_the_second_budget():
  reproduced, verdict = decode_budget.judge(_decode_rows(0.004, 0.979))
  assert reproduced == "yes" and "Keeping 16 cached tokens" in verdict
  assert decode_budget.judge(_decode_rows(0.004, 0.90))[0] == "partly"
  assert decode_budget.judge(_decode_rows(0.2, 0.90))[0] == "no"


def _neurons(firing: float, k16: float) -> dict:
  return {"layers": [{"site": "layer_0/ffn/hidden", "firing_fraction": firing,
                      "near_zero_fraction": 0.05, "dead": 0, "always_on": 0, "neurons": 512,
                      "top_token_score": 0.9, "top_bigram_score": 0.9,
                      "top_positional_bits": 0.01}],
          "probes": [{"label": "in_word", "site": "layer_1/ffn/hidden", "majority": 0.6,
                      "k1": 0.8, "k4": 0.9, "k16": k16}]}


def test_lm_neurons_needs_sparse_firing_and_a_good_probe():
  assert lm_neurons.judge(_neurons(0.3, 0.95))[0] == "yes"
  assert lm_neurons.judge(_neurons(0.7, 0.95))[0] == "partly"
  assert lm_neurons.judge(_neurons(0.7, 0.65))[0] == "no"
