"""Claim: removing whole residual blocks chosen at initialisation keeps the deep LM's quality at
the shallow LM's training compute ("layers play the lottery").

  python -m experiments.claims layer_lottery [--seeds 5] [--fast]

Per seed, through the real trainer at `lm_runs.SMALL` size (width 64, 300 steps of 16 x 64
bytes): the 4-block LM is drawn at init exactly as its own run draws it; `experiments.layer_drop`
scores its blocks by SNIP (|θ ⊙ ḡ| summed per block, ḡ the gradient at init averaged over the
first 4 training batches), removes the 2 lowest and saves the 2-block params as a checkpoint that
the 2-block run starts from (`config.init.from_workdir`). Arms, all 300 steps: that ticket; the
same init with a random other pair of blocks removed; a 2-block LM from scratch (equal compute to
the tickets); and the full 4-block LM (twice the block compute, the reference). A full run (5
seeds x 4 runs, 2 block-scorings per seed) took 7 minutes of CPU time (36 min wall on the
shared, heavily loaded 2-core machine); `--fast` runs 2-step arms of the FAST width-32 LM
(4 blocks -> 2) on the first seed only (29 s). Measured: SNIP (and grad_norm) at init score
the blocks in decreasing order of depth in every seed, so the ticket is the first two blocks,
which under Flax's path-keyed init is exactly the 2-block LM from scratch.
"""
import os
import tempfile
from typing import Sequence

from experiments import claims
from experiments import layer_drop
from experiments.claims import lm_runs
from experiments.claims import moe_lm_flops
from experiments.configs import lm_dense

DEEP, SHALLOW = 4, 2  # blocks of the full LM and of the equal-compute arms
SCORE = "snip"
ARMS = ("full_4", "snip_drop", "random_drop", "scratch_2")
CONTROLS = ("random_drop", "scratch_2")  # what the scored ticket must beat


def sized(num_layers: int, from_workdir: str | None = None) -> tuple[dict, dict]:
  """(overrides, fast_overrides) of `lm_runs.configure` for an LM of `num_layers` blocks that
  starts from `from_workdir`'s params when given."""
  keys = {"model.num_layers": num_layers}
  if from_workdir is not None:
    keys["init.from_workdir"] = from_workdir
  return {**lm_runs.SMALL, **keys}, keys


def train(name: str, seed: int, fast: bool, num_layers: int,
          from_workdir: str | None = None) -> dict:
  overrides, fast_overrides = sized(num_layers, from_workdir)
  [row] = lm_runs.train_arms([(name, lm_dense.get_config)], [seed], fast, overrides,
                             fast_overrides=fast_overrides)
  return {**row, "blocks": num_layers}


def run(seeds: Sequence[int], fast: bool) -> dict:
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds[:1] if fast else seeds:
      deep = lm_runs.configure(lm_dense.get_config(), seed, fast, *sized(DEEP))
      tickets = {name: os.path.join(scratch, f"{name}_{seed}") for name in ARMS[1:3]}
      scored = layer_drop.write_shallow_init(deep, tickets["snip_drop"], DEEP - SHALLOW, SCORE)
      dropped = {"snip_drop": scored["dropped"], "random_drop": layer_drop.write_shallow_init(
          deep, tickets["random_drop"], DEEP - SHALLOW, "random",
          avoid=tuple(scored["dropped"]))["dropped"]}
      rows.append({**train("full_4", seed, fast, DEEP), "dropped": [],
                   "scores": scored["scores"]})
      for name, workdir in tickets.items():
        rows.append({**train(name, seed, fast, SHALLOW, workdir), "dropped": dropped[name]})
      rows.append({**train("scratch_2", seed, fast, SHALLOW), "dropped": []})
  return {"runs": rows, "deep": DEEP, "shallow": SHALLOW, "score": SCORE}


def _stats(payload: dict) -> dict[str, tuple[float, float]]:
  return {arm: claims.mean_std(v)
          for arm, v in claims.group(payload["runs"], "arm", "eval_bpb").items()}


def depth_gain_kept(payload: dict, arm: str) -> float | None:
  """(bpb_scratch − bpb_arm) / (bpb_scratch − bpb_full) of the means: the share of the deep LM's
  gain over the equal-compute shallow LM that `arm` keeps (None when depth gains nothing)."""
  stats = _stats(payload)
  gain = stats["scratch_2"][0] - stats["full_4"][0]
  return None if gain <= 0 else (stats["scratch_2"][0] - stats[arm][0]) / gain


def table(payload: dict) -> str:
  runs, shallow = payload["runs"], payload["shallow"]
  bpb = claims.group(runs, "arm", "eval_bpb")
  dropped = claims.group(runs, "arm", "dropped")
  rows = []
  for arm in bpb:
    blocks = next(r["blocks"] for r in runs if r["arm"] == arm)
    kept = depth_gain_kept(payload, arm) if arm in ("snip_drop", "random_drop") else None
    rows.append([f"`{arm}`", blocks, f"{blocks / shallow:.0f}x",
                 " ".join("-" if not d else "".join(map(str, d)) for d in dropped[arm]),
                 claims.fmt(bpb[arm]), "-" if kept is None else f"{kept:.0%}"])
  return claims.markdown_table(
      ["arm", "blocks trained", "block compute", "blocks removed (per seed)", "eval bpb",
       "depth gain kept"], rows)


def judge(payload: dict) -> tuple[str, str]:
  """yes: the SNIP ticket within the full LM's seed spread (not clearly above every full seed)
  and clearly below both controls; no: clearly above the full LM and not clearly below either
  control; partly otherwise."""
  bpb = claims.group(payload["runs"], "arm", "eval_bpb")
  stats = _stats(payload)
  full_wins = moe_lm_flops.compare(bpb["full_4"], bpb["snip_drop"]) == "clear"
  checks = {arm: moe_lm_flops.compare(bpb["snip_drop"], bpb[arm]) for arm in CONTROLS}
  if not full_wins and all(c == "clear" for c in checks.values()):
    reproduced = "yes"
  elif full_wins and all(c != "clear" for c in checks.values()):
    reproduced = "no"
  else:
    reproduced = "partly"
  kept = depth_gain_kept(payload, "snip_drop")
  cell = lambda arm: f"{stats[arm][0]:.3f} ± {stats[arm][1]:.3f}"
  last = list(range(payload["shallow"], payload["deep"]))
  tickets = [r for r in payload["runs"] if r["arm"] == "snip_drop"]
  same = sum(r["dropped"] == last for r in tickets)
  note = (f" SNIP removed the last blocks {last} in {same} of {len(tickets)} seeds: with Flax's "
          f"path-keyed init that ticket is exactly the 2-block LM from scratch." if same else "")
  return reproduced, (
      f"At equal (2-block) compute the SNIP ticket reaches {cell('snip_drop')} bpb against "
      f"random removal {cell('random_drop')} ({checks['random_drop']}) and 2 blocks from scratch "
      f"{cell('scratch_2')} ({checks['scratch_2']}); the full 4-block LM at twice the compute "
      f"{cell('full_4')} ({'clearly better' if full_wins else 'within the spread'}), so the "
      f"ticket keeps {'no measurable share' if kept is None else f'{kept:.0%}'} of depth's gain "
      f"(clear: every seed below every seed of the other arm).{note}")


def plot(payload: dict, path: str) -> None:
  claims.bar_plot(path, claims.group(payload["runs"], "arm", "eval_bpb"), "eval bits/byte",
                  "blocks removed at init (4 -> 2) vs 2 from scratch vs full 4: eval bpb")


CLAIM = claims.Claim(
    name="layer_lottery",
    title="Layers play the lottery",
    source="Jordao, de Araujo, Maia and Pedrini, 2023, \"When Layers Play the Lottery, all "
           "Tickets Win at Initialization\"",
    statement="Removing whole layers (residual blocks) of a network at initialisation, chosen "
              "by a data-driven pruning-at-init criterion, yields winning tickets: the shallower "
              "network trained from the original init matches or exceeds the accuracy of the "
              "full network while training up to about 2x faster (residual CNNs on CIFAR and "
              "ImageNet; the paper scores layers with criteria such as GraSP; SNIP here).",
    setup="The byte LM at the claims' small size (pre-LN blocks of width 64, AdamW, the same "
          "steps of 16 x 64 bytes for every arm); a 4-block LM at init loses its 2 "
          "lowest-SNIP blocks (scores from the gradient at init on the first 4 training "
          "batches) and the 2-block remainder is trained from that init; controls at the same "
          "compute: a random other pair removed from the same init, and a 2-block LM from "
          "scratch; reference: the full 4-block LM (twice the block compute).",
    expected="the SNIP ticket within the full 4-block LM's seed spread and below both "
             "equal-compute controls by more than the seed spread",
    run=run, table=table, judge=judge, plot=plot, default_seeds=5, minutes=7)
