"""The attention benchmark: its masks and baseline are what it says, and --quick runs every case."""
import json

import jax
import numpy as np
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import attention

CASES = ["dense_L512", "bsa_d10_L512", "bsa_d25_L512", "bsa_d50_L512", "bsa_d100_L512"]
DECODE_CASES = ["decode_full_ctx512", "decode_topk_ctx512"]


def test_causal_block_masks_keep_the_diagonal_and_the_stated_share_of_causal_blocks():
  mask_HRR = attention.causal_block_mask(3, 20, 0.25, np.random.default_rng(0))
  for mask_RR in mask_HRR:
    assert mask_RR.sum() == round(0.25 * 20 * 21 / 2)
    assert mask_RR.diagonal().all() and not np.triu(mask_RR, 1).any()
  assert (mask_HRR[0] != mask_HRR[1]).any()  # drawn per head
  with pytest.raises(ValueError, match=r"density=0.05 keeps fewer blocks than the 20 diagonal"):
    attention.causal_block_mask(1, 20, 0.05, np.random.default_rng(0))


def test_dense_baseline_is_causal_softmax_attention():
  q, k, v = (jax.random.normal(key, (1, 2, 10, 4)) for key in jax.random.split(
      jax.random.PRNGKey(0), 3))
  scores = np.einsum("bhtk,bhsk->bhts", q, k) / 2.0
  scores = np.where(np.tri(10, dtype=bool), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  expected = np.einsum("bhts,bhsk->bhtk", weights / weights.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(attention.dense_causal_attention(q, k, v), expected, atol=1e-5)


def test_quick_run_writes_every_case_with_speedups_and_targets(tmp_path, capsys):
  assert "attention" in bench.benchmark_names()
  path = tmp_path / "attention.json"
  assert bench_main.main(["attention", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [r["case"] for r in rows] == CASES + DECODE_CASES
  by_case = {r["case"]: r for r in rows}
  dense_s = by_case["dense_L512"]["median_s"]
  for name in CASES[1:]:
    assert by_case[name]["speedup"] == pytest.approx(dense_s / by_case[name]["median_s"])
  assert [by_case[n].get("target") for n in CASES[1:]] == [6.0, None, 1.5, pytest.approx(1 / 1.15)]
  assert by_case["bsa_d100_L512"]["stored_blocks"] == 2 * 32 * 33 // 2
  assert "bsa_d10_L512" in capsys.readouterr().out


def test_decode_cases_run_alone_and_compare_page_selection_with_full_attention(tmp_path):
  path = tmp_path / "decode.json"
  assert bench_main.main(["attention_decode", "--quick", "--repeats", "1", "--json",
                          str(path)]) == 0
  full, topk = json.loads(path.read_text())
  assert [full["case"], topk["case"]] == DECODE_CASES
  assert topk["speedup"] == pytest.approx(full["median_s"] / topk["median_s"])
  assert (topk["target"], topk["budget"], topk["selection"]) == (4.0, 64, "pages P=16")
  cache = attention.filled_cache(2, 4, 64, 16, np.random.default_rng(0))
  np.testing.assert_array_equal(cache.lengths_L, [64])  # every slot filled
