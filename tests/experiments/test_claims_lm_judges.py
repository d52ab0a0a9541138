"""Verdicts of the LM claims on hand-written payloads (their runs train LMs: too slow here)."""
from experiments.claims import decode_budget
from experiments.claims import default_lm
from experiments.claims import lm_neurons
from experiments.claims import lm_runs
from experiments.claims import sparse_attention
from experiments.configs import lm_dense
from sparsejax.attention import decode


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


def test_the_fast_default_lm_has_the_layers_that_decode_budget_and_lm_neurons_read():
  config = lm_runs.configure(lm_dense.get_config(), 0, True,
                             fast_overrides=lm_runs.FAST_DEFAULT_LM)
  assert (config.model.num_layers, config.model.d_model, config.train.seq_len,
          config.train.num_steps) == (3, 32, 128, 2)
  # decode_budget's TidalDecode plan: layer 0 full, layer 1 selects, layer 2 reuses.
  assert decode.selection_plan(config.model.num_layers, "tidal", num_full=1) == (
      "full", "select", "reuse")
  assert lm_neurons.PROBE_SITE.startswith("layer_1/") and config.model.num_layers > 1


def test_default_lm_needs_bpb_under_unigram_and_a_small_seed_range():
  runs = [{"eval_bpb": value, "steps": 2} for value in (8.0, 8.2)]
  reproduced, verdict = default_lm.judge({"runs": runs, "corpus": {"unigram_bits": 4.6}})
  assert reproduced == "no" and "3.50 bits/byte above the unigram entropy" in verdict
  runs = [{"eval_bpb": value, "steps": 400} for value in (2.14, 2.16)]
  reproduced, verdict = default_lm.judge({"runs": runs, "corpus": {"unigram_bits": 4.6}})
  assert reproduced == "partly" and "2.45 bits/byte under the unigram entropy" in verdict
  runs = [{"eval_bpb": value, "steps": 400} for value in (2.144, 2.148, 2.146)]
  reproduced, verdict = default_lm.judge({"runs": runs, "corpus": {"unigram_bits": 4.6}})
  assert reproduced == "yes" and "2.146 ± 0.002 over 3 seeds (range 0.004)" in verdict
