"""Sparse attention patterns on the default LM at equal steps: eval bpb against attended fraction.

  python -m experiments.claims sparse_attention [--seeds 1] [--fast]

Trains `experiments/configs/lm_dense.py` (3 layers, 4 heads, 400 steps of 32 x 128 bytes of the
embedded corpus) once per row of `ATTENTIONS` and seed, with only `model.attention` changed,
exactly as `python -m experiments.train --config=experiments/configs/lm_dense.py
--config.model.attention...` would (`lm_runs.train_arms`). The attended fraction is the mean over
layers of the last logged layer_*/attention/attended_fraction (mean over queries of attended /
causal keys; 1 for dense attention). A full run takes about an hour on a 2-core CPU per seed.
`--fast`: one block of width 32, 2 steps of 4 x 128 bytes. In the spirit of Nawrot et al. 2025,
"The Sparse Frontier: Sparse Attention Trade-offs in Transformer LLMs" (quality against the
fraction of attention computed, at equal training).
"""
from typing import Sequence

from experiments import claims
from experiments.claims import lm_runs
from experiments.configs import lm_dense

_BLOCK = {"name": "block_sparse", "block": 16}
# (key, row name, model.attention); block-sparse rows cut the 128 positions into blocks of 16.
ATTENTIONS = (
    ("dense", "dense", {"name": "dense"}),
    ("window_global", "window 32 + 16 global tokens (sparse_attn_lm.py)",
     {**_BLOCK, "pattern": "window_global", "window": 32, "num_global": 16}),
    ("routing", "routing: window 16 + 4 k-means clusters (routing_attn_lm.py)",
     {"name": "routing", "num_clusters": 4, "window": 16}),
    ("window", "window (last 32 keys)", {**_BLOCK, "pattern": "window", "window": 32}),
    ("strided", "strided (stride 16)", {**_BLOCK, "pattern": "strided", "stride": 16}),
    ("fixed", "fixed (stride 32, summary 4)",
     {**_BLOCK, "pattern": "fixed", "stride": 32, "summary": 4}),
    ("bigbird", "bigbird (window 32, 16 global, 1 random block)",
     {**_BLOCK, "pattern": "bigbird", "window": 32, "num_global": 16, "num_random": 1}),
    ("entmax", "entmax (alpha per head)", {"name": "entmax", "normalizer": "entmax"}),
)


NAMES = {key: name for key, name, _ in ATTENTIONS}
TIE = 0.03  # bits/byte: about twice the default LM's seed std over 3 seeds (default_lm)


def _factory(attention: dict):
  def config():
    c = lm_dense.get_config()
    c.model.attention.update(attention)
    return c
  return config


def run(seeds: Sequence[int], fast: bool) -> dict:
  arms = [(key, _factory(attention)) for key, _, attention in ATTENTIONS]
  rows = lm_runs.train_arms(arms, seeds, fast, layer_metrics=("attention/attended_fraction",),
                            fast_overrides=lm_runs.WINDOWS_128)
  for row in rows:
    fraction = row.pop("attention/attended_fraction")
    row["attended_fraction"] = 1.0 if fraction is None else round(fraction, 4)
  return {"runs": rows}


def table(payload: dict) -> str:
  rows = payload["runs"]
  bpb = claims.group(rows, "arm", "eval_bpb")
  fraction = claims.group(rows, "arm", "attended_fraction")
  return claims.markdown_table(
      ["attention", "eval bpb", "attended fraction", "steps"],
      [[NAMES[arm], claims.fmt(bpb[arm]), claims.fmt(fraction[arm]), rows[0]["steps"]]
       for arm in bpb])


def judge(payload: dict) -> tuple[str, str]:
  """Yes when every fixed or routed pattern (all but entmax) is within TIE of dense or better."""
  bpb = {arm: claims.mean_std(v)[0] for arm, v in claims.group(payload["runs"], "arm",
                                                              "eval_bpb").items()}
  structured = [arm for arm in bpb if arm not in ("dense", "entmax")]
  ties = [arm for arm in structured if bpb[arm] <= bpb["dense"] + TIE]
  best = min(structured, key=bpb.get)
  reproduced = ("yes" if len(ties) == len(structured) else "partly" if ties else "no")
  return reproduced, (f"{len(ties)} of {len(structured)} structured patterns are within {TIE} "
                      f"bits/byte of dense attention ({bpb['dense']:.3f}) or better; the best, "
                      f"{best}, reaches {bpb[best]:.3f}; α-entmax reaches {bpb['entmax']:.3f}.")


def plot(payload: dict, path: str) -> None:
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  fraction = claims.group(payload["runs"], "arm", "attended_fraction")
  with claims.figure(path, (5.5, 3.6), "sparse attention at equal steps (default LM)") as ax:
    for arm in bpb:
      x, y = claims.mean_std(fraction[arm])[0], claims.mean_std(bpb[arm])[0]
      ax.plot(x, y, "o", color="tab:red" if arm == "dense" else "tab:blue")
      ax.annotate(arm, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("attended fraction of the causal keys")
    ax.set_ylabel("eval bits/byte")


CLAIM = claims.Claim(
    name="sparse_attention",
    title="Sparse attention patterns at equal steps",
    source="Nawrot et al. 2025, The Sparse Frontier; Child et al. 2019 (strided, fixed); Zaheer et "
           "al. 2020 (BigBird); Roy et al. 2021 (Routing Transformer); Correia et al. 2019 (entmax)",
    statement="At equal training, sparse attention that keeps a good fraction of the keys matches "
              "dense attention's quality, so attention compute can be cut without loss.",
    setup="The default LM (`lm_dense.py`, 400 steps) with only `model.attention` changed; "
          "block-sparse patterns use blocks of 16 of the 128 positions; attended fraction = mean "
          "over queries of attended / causal keys.",
    expected="every structured pattern within 0.03 bits/byte of dense or better",
    run=run, table=table, judge=judge, plot=plot, default_seeds=1, minutes=65)
