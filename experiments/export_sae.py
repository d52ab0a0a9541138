"""Export a trained "sae" run in SAELens's layout, its input scaling folded into the weights.

  python -m experiments.export_sae --workdir=DIR --out=OUT_DIR

Reads DIR/config.json and DIR's latest checkpoint and rebuilds the run's task, which harvests the
activations again (or reads them from `sae.cache_dir`) to recompute the input scale s. The
exported SAE takes raw activations: s is folded into the weights
(`sparsejax.sae.export.fold_input_scale`), and a BatchTopK SAE goes out as the JumpReLU SAE it
computes at inference. Writes OUT_DIR/sae_weights.safetensors and OUT_DIR/cfg.json.
"""
import argparse
import os
import sys


from experiments import checkpoints as ckpt_lib
from experiments import tasks
from sparsejax.sae import core
from sparsejax.sae import export
from sparsejax.sae import layers


def export_run(workdir: str, out: str) -> dict:
  """Writes the SAE of the "sae" run in `workdir` to `out`; returns its SAELens cfg dict."""
  config, step, saved = ckpt_lib.restore_run(workdir, "sae")
  task = tasks.build_task(config)
  params, sae_config = saved["params"], task.sae_config
  if sae_config.kind == "batchtopk":
    params, sae_config = core.batchtopk_to_jumprelu(
        params, saved["model_state"][layers.STATS], sae_config)
  params = export.fold_input_scale(params, task.input_scale, target_scale=task.target_scale)
  sites = {"hook_name": ",".join(task.input_sites)}  # a layer group lists all its sites
  if task.target_sites:
    sites["hook_name_out"] = ",".join(task.target_sites)
  cfg = export.saelens_config(sae_config, **sites, step=step,
                              lm_workdir=os.path.abspath(config.sae.lm_workdir))
  export.save_saelens(out, params, cfg)
  return cfg


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.export_sae",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the workdir of a finished 'sae' run")
  parser.add_argument("--out", required=True, help="directory to write the SAELens files to")
  args = parser.parse_args(argv)
  try:
    cfg = export_run(args.workdir, args.out)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote a {cfg['architecture']!r} SAE ({cfg['d_in']} -> {cfg['d_sae']} latents) to "
        f"{args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
