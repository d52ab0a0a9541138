"""MoE layer forward + backward: dropless grouped matmul vs the usual ways to write an MoE.

`python -m experiments.bench moe [--json FILE] [--quick]`

Two shapes, fp32, GELU experts, T = 4096 tokens, d = 256 (`--quick`: T = 256, d = 32):

* coarse: E = 32 experts of hidden f = 512, top-2 (`--quick`: E = 4, f = 64);
* fine: E = 64 experts of hidden f = 128, top-8 (`--quick`: E = 16, f = 16, top-4), the
  fine-grained MoE (DeepSeekMoE) where dispatch overhead matters most: 8x more (token, expert)
  rows, each with a 4x smaller matmul.

Every case is one jitted call returning the gradients of sum(y * cotangent) w.r.t. the input and
all weights; all seven cases are timed interleaved (`timing.interleaved_cases`: one warm-up
round, then `--repeats` rounds of every case in turn; median_s with min_s / max_s as the
spread). All MoE cases route with the same `route_top_k` (renormalised gates); they differ in
how tokens reach the experts:

* `moe_dropless` / `moe_dropless_fine`: `sparsejax.moe.MoE`, capacity None: sort by expert,
  grouped matmul (`kernels.gmm.gmm`, XLA path on CPU), unsort.
* `moe_capacity`: the same layer with capacity factor 1.25 ([E, C, D] buffers, index scatter).
* `dense_ffn` / `dense_ffn_fine`: the baselines. A dense GELU FFN of hidden k f: the same active
  FLOPs per token.
* `onehot_einsum`: GShard / Mesh-TensorFlow style dispatch, capacity factor 1.25: one-hot
  dispatch and combine tensors [T, E, C] contracted with einsums.
* `ragged_dot`: dropless with `jax.lax.ragged_dot` for both expert matmuls (the obvious JAX
  way; its CPU lowering computes every row against every expert).

Columns: `time_vs_dense_ffn`, the case's time over its shape's dense FFN time;
`time_vs_moe_dropless` (coarse shape), over the coarse dropless layer's time.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.bench import timing
from sparsejax import models
from sparsejax.moe import dispatch as dispatch_lib
from sparsejax.moe import layers
from sparsejax.moe import plan as plan_lib
from sparsejax.moe import routing

DESCRIPTION = "MoE fwd+bwd: dropless grouped matmul vs dense FFN, one-hot einsum, ragged_dot"
BASELINE = "dense_ffn"
# Columns of the README table (experiments/claims/readme.py): {row key: header}.
README_COLUMNS = {"shape": "shape", "active_gflop": "active GFLOP",
                  "time_vs_dense_ffn": "time vs the dense FFN of its shape"}

TOP_K = 2  # of the coarse shape, which the one-hot and ragged_dot baselines use
FULL = {"tokens": 4096, "d_model": 256, "num_experts": 32, "d_ff": 512, "k": TOP_K}
QUICK = {"tokens": 256, "d_model": 32, "num_experts": 4, "d_ff": 64, "k": TOP_K}
FINE = {"tokens": 4096, "d_model": 256, "num_experts": 64, "d_ff": 128, "k": 8}
QUICK_FINE = {"tokens": 256, "d_model": 32, "num_experts": 16, "d_ff": 16, "k": 4}
CAPACITY_FACTOR = 1.25


def _grad_fn(apply_fn):
  """(params, x, cot) -> grads of sum(apply_fn(params, x) * cot) w.r.t. params and x."""

  def loss(params, x, cot):
    return jnp.sum(apply_fn(params, x) * cot)

  return jax.grad(loss, argnums=(0, 1))


def _module_fn(module, x_BTD):
  """(apply_fn, params) of a Flax module whose apply returns (y, aux)."""
  params = module.init(jax.random.PRNGKey(1), x_BTD)["params"]
  return (lambda p, x: module.apply({"params": p}, x)[0]), params


def _expert_ffn(x, params, matmul):
  return matmul(jax.nn.gelu(matmul(x, params["wi_EDF"])), params["wo_EFD"])


def _route(params, x_TD):
  logits_TE = x_TD @ params["router_DE"]
  plan, _ = routing.route_top_k(logits_TE, k=TOP_K, renormalize=True)
  return plan


def onehot_einsum_moe(params, x_BTD):
  """GShard dispatch: [T, E, C] one-hot dispatch/combine tensors and einsums."""
  batch, length, d_model = x_BTD.shape
  x_TD = x_BTD.reshape(-1, d_model)
  plan = _route(params, x_TD)
  num_experts = params["router_DE"].shape[1]
  capacity = plan_lib.compute_capacity(plan.num_tokens, TOP_K, num_experts, CAPACITY_FACTOR)
  plan = plan_lib.apply_capacity(plan, capacity)
  expert_TKE = jax.nn.one_hot(plan.expert_TK, num_experts) * plan.keep_TK[..., None]
  slot_TKC = jax.nn.one_hot(plan.slot_TK, capacity)
  dispatch_TEC = jnp.einsum("tke,tkc->tec", expert_TKE, slot_TKC)
  combine_TEC = jnp.einsum("tke,tkc,tk->tec", expert_TKE, slot_TKC, plan.gate_TK)
  x_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC, x_TD)
  y_ECD = _expert_ffn(x_ECD, params, lambda x, w: jnp.einsum("ecd,edf->ecf", x, w))
  return jnp.einsum("tec,ecd->td", combine_TEC, y_ECD).reshape(batch, length, d_model)


def ragged_dot_moe(params, x_BTD):
  """Dropless on expert-sorted rows with `jax.lax.ragged_dot` as the grouped matmul."""
  batch, length, d_model = x_BTD.shape
  x_TD = x_BTD.reshape(-1, d_model)
  plan = _route(params, x_TD)
  sizes_E = plan_lib.group_sizes(plan)
  matmul = lambda x, w: jax.lax.ragged_dot(x, w, sizes_E)
  y_RD = _expert_ffn(dispatch_lib.dispatch(x_TD, plan), params, matmul)
  return dispatch_lib.combine(y_RD, plan).reshape(batch, length, d_model)


def _moe(shape: dict) -> functools.partial:
  """The bench's `layers.MoE` for `shape`, without losses; pass capacity_factor."""
  return functools.partial(
      layers.MoE, d_model=shape["d_model"], d_ff=shape["d_ff"], num_experts=shape["num_experts"],
      k=shape["k"], router_kwargs={"renormalize": True}, expert="ffn", load_balance_weight=0.0,
      z_loss_weight=0.0)


def _inputs(shape: dict) -> tuple[jax.Array, jax.Array]:
  kx, kc = jax.random.split(jax.random.PRNGKey(0))
  x_BTD = jax.random.normal(kx, (1, shape["tokens"], shape["d_model"]), jnp.float32)
  return x_BTD, jax.random.normal(kc, x_BTD.shape, jnp.float32)


def _dense(shape: dict, x_BTD: jax.Array):
  return _module_fn(models.DenseFFN(d_model=shape["d_model"], d_ff=shape["k"] * shape["d_ff"]),
                    x_BTD)


def run(repeats: int, quick: bool) -> list[dict]:
  shape, fine = (QUICK, QUICK_FINE) if quick else (FULL, FINE)
  x_BTD, cot = _inputs(shape)
  moe = _moe(shape)
  dropless = moe(capacity_factor=None)
  params = nn.meta.unbox(dropless.init(jax.random.PRNGKey(1), x_BTD)["params"])
  fine_x_BTD, fine_cot = _inputs(fine)
  functions = {
      "dense_ffn": (_dense(shape, x_BTD), x_BTD, cot),
      "moe_dropless": (_module_fn(dropless, x_BTD), x_BTD, cot),
      "moe_capacity": (_module_fn(moe(capacity_factor=CAPACITY_FACTOR), x_BTD), x_BTD, cot),
      "onehot_einsum": ((onehot_einsum_moe, params), x_BTD, cot),
      "ragged_dot": ((ragged_dot_moe, params), x_BTD, cot),
      "dense_ffn_fine": (_dense(fine, fine_x_BTD), fine_x_BTD, fine_cot),
      "moe_dropless_fine": (_module_fn(_moe(fine)(capacity_factor=None), fine_x_BTD), fine_x_BTD,
                            fine_cot),
  }
  rows = timing.interleaved_cases(
      {name: (_grad_fn(fn), (p, x, c)) for name, ((fn, p), x, c) in functions.items()},
      repeats=repeats)
  by_case = {row["case"]: row for row in rows}
  for row in rows:
    is_fine = row["case"].endswith("_fine")
    row_shape = fine if is_fine else shape
    row.update(shape="fine" if is_fine else "coarse", num_experts=row_shape["num_experts"],
               top_k=row_shape["k"], expert_d_ff=row_shape["d_ff"],
               active_gflop=3 * 2 * row_shape["tokens"] * row_shape["k"] * 2
               * row_shape["d_model"] * row_shape["d_ff"] / 1e9,
               time_vs_dense_ffn=row["median_s"] / by_case[
                   "dense_ffn_fine" if is_fine else "dense_ffn"]["median_s"])
    if not is_fine:
      row["time_vs_moe_dropless"] = row["median_s"] / by_case["moe_dropless"]["median_s"]
  return rows
