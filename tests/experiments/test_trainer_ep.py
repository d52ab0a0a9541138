"""Expert-parallel training: the moe_lm config on an EP=4 mesh trains like EP=1; its checkpoint
restores on EP=2 and EP=1 meshes (Orbax reshards the expert weights); multi-host start-up."""
import jax
import numpy as np
import pytest

from experiments import checkpoints as ckpt_lib
from experiments import metrics as metrics_lib
from experiments import trainer as trainer_lib
from experiments import train as train_main
from experiments.configs import moe_lm

NUM_STEPS = 8


def tiny_moe_lm(data_dir, expert):
  """moe_lm.py (8 experts, top-2, dropless) shrunk to seconds, on 8 devices with mesh.expert.

  One layer and a 16-row grouped-matmul tile keep the compile short (the tile's window ladder
  has one size).
  """
  c = moe_lm.get_config()
  c.data.data_dir = data_dir
  c.model.update(d_model=32, num_layers=1, num_heads=2, d_ff=32, max_len=32)
  c.model.ffn.tile = 16
  c.train.update(num_steps=NUM_STEPS, batch_size=8, seq_len=32, log_every=1,
                 eval_every=NUM_STEPS, eval_batches=1, warmup_steps=2, plot_expert_load=False)
  c.checkpoint.every = NUM_STEPS
  c.mesh.update(data=-1, expert=expert)
  return c


def _train(config, workdir):
  """(train/loss per step, final params) of one run on all 8 devices."""
  t = trainer_lib.Trainer(config, str(workdir), jax.devices())
  try:
    t.run()
    params = jax.device_get(t.state["params"])
  finally:
    t.close()
  losses = {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(workdir))}
  return losses, params


@pytest.fixture(scope="module")
def ep4_run(stdlib_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ep4")
  losses, params = _train(tiny_moe_lm(stdlib_data_dir, expert=4), workdir)
  return workdir, losses, params


def test_ep4_loss_curve_matches_ep1(stdlib_data_dir, tmp_path, ep4_run):
  _, ep4_losses, _ = ep4_run
  ep1_losses, _ = _train(tiny_moe_lm(stdlib_data_dir, expert=1), tmp_path)
  assert sorted(ep1_losses) == list(range(1, NUM_STEPS + 1))
  for step, loss in ep1_losses.items():
    assert ep4_losses[step] == pytest.approx(loss, rel=1e-4), step
  assert ep4_losses[NUM_STEPS] < ep4_losses[1]


@pytest.mark.parametrize("expert", [2, 1])
def test_ep4_checkpoint_restores_on_smaller_expert_axes(stdlib_data_dir, ep4_run, expert):
  workdir, _, ep4_params = ep4_run
  config = tiny_moe_lm(stdlib_data_dir, expert=expert)
  t = trainer_lib.Trainer(config, str(workdir), jax.devices())
  try:
    abstract = ckpt_lib.abstract_like(t.abstract_state, t.state_shardings)
    state, meta = t.checkpoints.restore(NUM_STEPS, abstract)
  finally:
    t.close()
  assert meta["step"] == NUM_STEPS
  wi = state["params"]["layer_0"]["ffn"]["wi_EDF"]
  assert wi.sharding.spec[0] == "expert" and wi.sharding.mesh.shape["expert"] == expert
  restored = jax.device_get(state["params"])
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(ep4_params), strict=True):
    np.testing.assert_array_equal(got, want)


def test_batch_must_divide_over_the_expert_axis_too(stdlib_data_dir, tmp_path):
  config = tiny_moe_lm(stdlib_data_dir, expert=4)
  config.mesh.data = 2
  config.train.batch_size = 4
  with pytest.raises(trainer_lib.ConfigError, match=r"batch_size=4 .*mesh.expert=8"):
    trainer_lib.Trainer(config, str(tmp_path), jax.devices())


def test_num_experts_not_divisible_by_expert_axis(stdlib_data_dir, tmp_path):
  config = tiny_moe_lm(stdlib_data_dir, expert=4)
  config.model.ffn.num_experts = 6
  with pytest.raises(trainer_lib.ConfigError, match="num_experts=6 is not divisible"):
    trainer_lib.Trainer(config, str(tmp_path), jax.devices())


@pytest.mark.parametrize("flag,environ,expected", [
    ("auto", {}, False),
    ("auto", {"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1", "TPU_WORKER_HOSTNAMES": "h0"},
     False),
    ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ("auto", {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
    ("auto", {"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, True),
    ("auto", {"SLURM_NTASKS": "2"}, True),
    ("auto", {"OMPI_COMM_WORLD_SIZE": "16"}, True),
    ("auto", {"SLURM_NTASKS": "not a number"}, False),
    ("true", {}, True),
    ("false", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
])
def test_wants_distributed(flag, environ, expected):
  assert train_main.wants_distributed(flag, environ) is expected


def test_initialize_distributed_passes_process_count_and_id():
  calls = []
  environ = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": "1"}
  assert train_main.initialize_distributed("auto", environ, lambda **kw: calls.append(kw))
  assert calls == [{"num_processes": 2, "process_id": 1}]
  assert not train_main.initialize_distributed("auto", {}, lambda **kw: calls.append(kw))
  assert len(calls) == 1


def test_ep_benchmark_bytes_from_shapes():
  from experiments.bench import ep as ep_bench  # pylint: disable=g-import-not-at-top
  # T_l = 512 tokens per device, worst case B = 512 * min(2, 16 / 4) = 1024 rows per shard:
  # 4 exchanges of 3 * 1024 * 128 * 4 bytes = 6 MiB per device; 1 row in 4 carries a token.
  stats = ep_bench.exchange_stats(4096, 128, 16, ep=4, factor=None, chunks=1)
  assert stats == {"buffer_rows": 1024, "a2a_MiB_per_device": 6.0, "a2a_MiB_total": 48.0,
                   "payload": 0.25}
  assert ep_bench.exchange_stats(4096, 128, 16, ep=4, factor=1.25, chunks=1)["buffer_rows"] == 320
  assert ep_bench.exchange_stats(4096, 128, 16, ep=1, factor=None, chunks=1)["a2a_MiB_total"] == 0
