"""Expert parallelism: MoE layer fwd+bwd step time and all_to_all bytes vs the EP degree.

`python -m experiments.bench ep [--json FILE] [--quick]`

Runs on 8 devices: importing this module before JAX starts asks XLA for 8 fake CPU devices
(`--xla_force_host_platform_device_count=8`), so the command above just works on a laptop; on a
machine with accelerators it uses the first 8 real devices. Degrees that do not fit the devices
are skipped.

Shape: T = 4096 tokens (batch 16 x length 256), d = 128, E = 16 SwiGLU experts of hidden
f = 256, top-2, dropless, fp32 (`--quick`: T = 256, d = 32, E = 8, f = 64). Each case is one
jitted forward + backward of `sparsejax.moe.MoE` (gradients w.r.t. input and all weights) on a
(data, expert) mesh of 8 devices, tokens sharded over data x expert:

* `ep1`: the baseline, mesh (8, 1): data parallel, every device holds all experts and runs its
  own tokens in the layer's `shard_map` (`expert_parallel="auto"`); nothing is exchanged.
* `gspmd_dp8`: the same mesh with `expert_parallel=False`: the single-device layer's array code
  partitioned by GSPMD from the input and weight shardings alone (the straightforward way).
* `ep2`, `ep4`, `ep8`: meshes (4, 2), (2, 4), (1, 8), expert-parallel (`sparsejax.moe.parallel`)
  with the worst-case exchange buffer (never drops).
* `ep4_f1.25`: EP 4 with a buffer for 1.25x a balanced load (drops the overflow).
* `ep4_chunks2`: EP 4, tokens exchanged in 2 chunks (overlap on TPU / GPU; same result).

Extra columns, computed from shapes: `buffer_rows` B per destination and chunk,
`a2a_MiB_per_device` activation bytes one device sends per step (2 all_to_alls forward, 2
backward, per chunk: 4 (n_ep - 1) B d 4 bytes; the int32 expert id of each row adds 1/d of one
of them), `a2a_MiB_total` over the 8 devices, and `payload` the fraction of sent rows that carry
a token (k T_l / (n_ep B)). On fake CPU devices all "devices"
share the host's cores, so step time measures the extra work of EP (packing, padding, exchange
copies), not the speed-up of a real mesh.

The cases run on different meshes of the same 8 devices, yet share one process and are timed
interleaved (`timing.interleaved_cases`: a warm-up round, then `--repeats` rounds of every case
in turn; median_s, min_s, max_s): each is compiled ahead of time under its own mesh
(`jax.set_mesh`), and a compiled step needs no mesh in context to run.
"""
import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # effective only if JAX has not started yet
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.bench import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from sparsejax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from sparsejax.moe import layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from sparsejax.moe import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

DESCRIPTION = "Expert-parallel MoE fwd+bwd on 8 devices: step time and all_to_all bytes vs EP"
BASELINE = "ep1"
# Columns of the README table (experiments/claims/readme.py): {row key: header}.
README_COLUMNS = {"ep": "EP degree", "a2a_MiB_per_device": "all_to_all MiB / device / step",
                  "payload": "buffer rows carrying a token"}

NUM_DEVICES = 8
FULL = {"batch": 16, "length": 256, "d_model": 128, "num_experts": 16, "d_ff": 256}
QUICK = {"batch": 8, "length": 32, "d_model": 32, "num_experts": 8, "d_ff": 64}
TOP_K = 2
# (case, EP degree, buffer factor, chunks, expert_parallel)
CASES = (("ep1", 1, None, 1, "auto"), ("gspmd_dp8", 1, None, 1, False),
         ("ep2", 2, None, 1, "auto"), ("ep4", 4, None, 1, "auto"), ("ep8", 8, None, 1, "auto"),
         ("ep4_f1.25", 4, 1.25, 1, "auto"), ("ep4_chunks2", 4, None, 2, "auto"))


def exchange_stats(num_tokens: int, d_model: int, num_experts: int, ep: int, factor, chunks: int,
                   num_devices: int = NUM_DEVICES, itemsize: int = 4) -> dict:
  """Buffer rows, all_to_all bytes per step (per device and total) and payload, from shapes."""
  if ep == 1:
    return {"buffer_rows": 0, "a2a_MiB_per_device": 0.0, "a2a_MiB_total": 0.0, "payload": 1.0}
  chunk = num_tokens // num_devices // chunks
  buffer = parallel.exchange_buffer_size(chunk, TOP_K, TOP_K, num_experts, ep,
                                         buffer_factor=factor)
  per_device = 4 * chunks * parallel.all_to_all_bytes(buffer, d_model, ep, itemsize)
  return {"buffer_rows": buffer, "a2a_MiB_per_device": per_device / 2**20,
          "a2a_MiB_total": num_devices * per_device / 2**20,
          "payload": min(1.0, TOP_K * chunk / (ep * buffer))}


def _grad_fn(layer):
  def loss(params, x, cot):
    y, aux = layer.apply({"params": params}, x)
    return jnp.sum(y * cot) + sum(aux["losses"].values())

  return jax.grad(loss, argnums=(0, 1))


def run(repeats: int, quick: bool) -> list[dict]:
  shape = QUICK if quick else FULL
  devices = jax.devices()[:NUM_DEVICES]
  if len(devices) < 2:
    raise ValueError(f"the ep benchmark needs several devices, got {len(devices)}; run it as "
                     f"`python -m experiments.bench ep` before anything starts JAX, or set "
                     f"XLA_FLAGS={_FLAG}=8")
  batch, length, d_model = shape["batch"], shape["length"], shape["d_model"]
  num_experts, num_tokens = shape["num_experts"], shape["batch"] * shape["length"]
  kx, kc = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (batch, length, d_model), jnp.float32)
  cot = jax.random.normal(kc, x.shape, jnp.float32)
  base = dict(d_model=d_model, d_ff=shape["d_ff"], num_experts=num_experts, k=TOP_K,
              router_kwargs={"renormalize": True}, expert="swiglu")
  boxed = jax.eval_shape(layers.MoE(**base).init, jax.random.PRNGKey(1), x)["params"]
  params = nn.meta.unbox(jax.jit(layers.MoE(**base).init)(jax.random.PRNGKey(1), x)["params"])
  cases, extra = {}, {}
  for name, ep, factor, chunks, expert_parallel in CASES:
    if len(devices) % ep or num_experts % ep:
      continue
    mesh = sharding.make_mesh(data=len(devices) // ep, expert=ep, devices=devices)
    layer = layers.MoE(**base, ep_buffer_factor=factor, ep_num_chunks=chunks,
                       expert_parallel=expert_parallel)
    with jax.set_mesh(mesh):
      placed = jax.device_put(params, sharding.logical_to_mesh_sharding(
          nn.get_partition_spec(boxed), mesh))
      x_sharded = jax.device_put(x, sharding.logical_to_mesh_sharding(
          jax.sharding.PartitionSpec("batch", "length", "embed"), mesh))
    cases[name] = (_grad_fn(layer), (placed, x_sharded, cot), mesh)
    extra[name] = {"ep": ep, **exchange_stats(num_tokens, d_model, num_experts, ep, factor,
                                              chunks, len(devices))}
  rows = timing.interleaved_cases(cases, repeats=repeats)
  for row in rows:
    row.update(extra[row["case"]])
  return rows
