"""MoE layer forward + backward: dropless grouped matmul vs the usual ways to write an MoE.

`python -m experiments.bench moe [--json FILE] [--quick]`

Shape: T = 4096 tokens, d = 256, E = 32 experts of hidden f = 512, top-2, GELU experts, fp32
(`--quick`: T = 256, d = 32, E = 4, f = 64). Every case is one jitted call returning the
gradients of sum(y * cotangent) w.r.t. the input and all weights; the five cases are timed
interleaved (`timing.interleaved_cases`: one warm-up round, then `--repeats` rounds of every case
in turn; median_s with min_s / max_s as the spread). All MoE cases route with the same
`route_top_k` (renormalised gates); they differ in how tokens reach the experts:

* `moe_dropless`: `sparsejax.moe.MoE`, capacity None: sort by expert, grouped matmul
  (`kernels.gmm.gmm`, XLA path on CPU), unsort.
* `moe_capacity`: the same layer with capacity factor 1.25 ([E, C, D] buffers, index scatter).
* `dense_ffn`: the baseline. A dense GELU FFN of hidden 2f: the same active FLOPs per token.
* `onehot_einsum`: GShard / Mesh-TensorFlow style dispatch, capacity factor 1.25: one-hot
  dispatch and combine tensors [T, E, C] contracted with einsums.
* `ragged_dot`: dropless with `jax.lax.ragged_dot` for both expert matmuls (the obvious JAX
  way; its CPU lowering computes every row against every expert).
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

FULL = {"tokens": 4096, "d_model": 256, "num_experts": 32, "d_ff": 512}
QUICK = {"tokens": 256, "d_model": 32, "num_experts": 4, "d_ff": 64}
TOP_K = 2
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


def run(repeats: int, quick: bool) -> list[dict]:
  shape = QUICK if quick else FULL
  tokens, d_model, num_experts, d_ff = (shape[k] for k in ("tokens", "d_model", "num_experts",
                                                           "d_ff"))
  kx, kc = jax.random.split(jax.random.PRNGKey(0))
  x_BTD = jax.random.normal(kx, (1, tokens, d_model), jnp.float32)
  cot = jax.random.normal(kc, x_BTD.shape, jnp.float32)
  moe = functools.partial(
      layers.MoE, d_model=d_model, d_ff=d_ff, num_experts=num_experts, k=TOP_K,
      router_kwargs={"renormalize": True}, expert="ffn", load_balance_weight=0.0,
      z_loss_weight=0.0)
  dropless = moe(capacity_factor=None)
  params = nn.meta.unbox(dropless.init(jax.random.PRNGKey(1), x_BTD)["params"])
  active_flops = 3 * 2 * tokens * TOP_K * 2 * d_model * d_ff  # fwd + bwd, two matmuls
  functions = {
      "dense_ffn": _module_fn(models.DenseFFN(d_model=d_model, d_ff=TOP_K * d_ff), x_BTD),
      "moe_dropless": _module_fn(dropless, x_BTD),
      "moe_capacity": _module_fn(moe(capacity_factor=CAPACITY_FACTOR), x_BTD),
      "onehot_einsum": (onehot_einsum_moe, params),
      "ragged_dot": (ragged_dot_moe, params),
  }
  rows = timing.interleaved_cases(
      {name: (_grad_fn(fn), (p, x_BTD, cot)) for name, (fn, p) in functions.items()},
      repeats=repeats)
  rows[0]["active_gflop"] = active_flops / 1e9
  dropless_s = rows[1]["median_s"]
  for row in rows:
    row["time_vs_moe_dropless"] = row["median_s"] / dropless_s
  return rows
