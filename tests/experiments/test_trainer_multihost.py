"""The trainer in 2 real processes (jax.distributed on CPU, 4 fake devices each): each process
reads only its rows of the global batch, and the losses equal the single-process run's."""
import json

import pytest

from experiments import metrics as metrics_lib
from experiments.data import loader
from experiments.tasks import lm
from tests.experiments import multihost
from tests.experiments.test_trainer import losses
from tests.experiments.test_trainer import run
from tests.experiments.test_trainer import tiny_config

STEPS = 6

_CODE = """
import json
from experiments import trainer
from experiments.tasks import lm
from tests.experiments.test_trainer import tiny_config

reads = []
window = lm.data_lib.WindowDataset.__getitem__
def recording_getitem(self, i):
  reads.append(int(i))
  return window(self, i)
lm.data_lib.WindowDataset.__getitem__ = recording_getitem

config = tiny_config({data_dir!r}, num_steps={steps}, log_every=1, eval_every={steps})
config.mesh.data = 8
config.train.batch_size = 8
t = trainer.Trainer(config, {workdir!r})
t.run()
t.close()
print(json.dumps({{"rows": t.rows.tolist(), "reads": reads}}))
"""


def test_two_processes_read_their_rows_and_match_one_process(stdlib_data_dir, tmp_path):
  single = tiny_config(stdlib_data_dir, num_steps=STEPS, log_every=1, eval_every=STEPS)
  single.mesh.data = 8
  single.train.batch_size = 8
  run(single, tmp_path / "one", devices=8)
  workdir = tmp_path / "two"
  code = _CODE.format(data_dir=stdlib_data_dir, steps=STEPS, workdir=str(workdir))
  outputs = [json.loads(out.strip().splitlines()[-1])
             for out in multihost.run_processes(code, timeout_s=240)]
  assert [out["rows"] for out in outputs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  # Each process read the windows of its own rows of each step (and of the batches its
  # prefetch read ahead), none of the other process's rows.
  order = loader.global_order(len(lm.data_lib.load_windows(
      "python_stdlib", "train", 32, data_dir=stdlib_data_dir)), seed=0)
  ahead = STEPS + 4
  for out in outputs:
    own = {order[8 * step + row] for step in range(ahead) for row in out["rows"]}
    others = {order[8 * step + row] for step in range(ahead) for row in range(8)} - own
    assert set(out["reads"]) >= {order[8 * step + row] for step in range(STEPS)
                                 for row in out["rows"]}
    assert set(out["reads"]) <= own and not set(out["reads"]) & others
  one, two = losses(tmp_path / "one"), losses(workdir)
  assert sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-5), step
  evals = [r for r in metrics_lib.read_metrics(str(workdir)) if "eval/loss" in r]
  ref = [r for r in metrics_lib.read_metrics(str(tmp_path / "one")) if "eval/loss" in r]
  assert evals[-1]["eval/loss"] == pytest.approx(ref[-1]["eval/loss"], rel=1e-5)
