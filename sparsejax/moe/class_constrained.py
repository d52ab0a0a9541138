"""Class-constrained conv MoE: while training, the positions of an image of class c may only go
to the experts assigned to c; at test time the router is free.

An assignment A (Y x E booleans, A[c, e]: expert e serves class c) fixes which experts each class
trains. A token t with label y, an image routed as one by its positions' mean logits
(granularity "image") or a single position ("position"), selects its top-k experts by

  l_te + m_te,     l_te = x_t W_r,     m_te = 0 if A[y, e] else -1e9,

so with k <= |{e : A[y, e]}| every choice lies in the class's expert set, and only those experts
learn from class y. Gates are the unmasked router's (softmax of l), as at test time, and the
loss "class_routing" = -mean_t log sum_{e : A[y_t, e]} softmax(l_t)_e trains the router to make
the class's choice by itself. At test time there are no labels and the router is free; how
often it picks within the class's set, and the class x expert routing frequency
(`routing_frequency`), show what the experts have specialised on
(`experiments/expert_specialisation.py` plots it).

This is a supervised, hard form of expert specialisation for the MoE CNN of Pavlitska et al.,
2022, "Sparsely-gated Mixture-of-Expert Layers for CNN Interpretability" (whose "hard
constraints" instead let the gate weights of some experts become zero, specialisation
emerging without labels); experts owning class subsets follow the specialists of Hinton et al.,
2015, "Distilling the Knowledge in a Neural Network", and Ahmed et al., 2016, "Network of
Experts for Large-Scale Image Categorization".

Shape letters beyond the DESIGN legend: Y classes; H, W, C a feature map's height, width and
channels.
"""
import functools
from typing import ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.auxiliary import Aux
from sparsejax.moe import core
from sparsejax.moe import routing
from sparsejax.moe.conv import ConvMoE
from sparsejax.moe.layers import ffn_expert_fn
from sparsejax.moe.layers import ffn_params
from sparsejax.moe.layers import router_params
from sparsejax.registry import FFNS

MASKED_LOGIT = -1e9  # selection bias of experts outside a token's class set
GRANULARITIES = ("image", "position")
ROUTES = "expert_TK"  # the router's choices, sown in the "intermediates" collection


def class_expert_assignment(num_classes: int, num_experts: int, experts_per_class: int
                            ) -> np.ndarray:
  """A[c, e] = True for the n = experts_per_class experts (c n + j) mod E, j < n: `[Y, E]`.

  Classes take consecutive blocks of n experts, wrapping around, so every expert serves
  ceil or floor of Y n / E classes (e.g. Y = 10, E = 5, n = 1: expert e serves c = e, e + 5).
  """
  for name, value in (("num_classes", num_classes), ("num_experts", num_experts)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if not 1 <= experts_per_class <= num_experts:
    raise ValueError(f"experts_per_class must be in [1, num_experts={num_experts}], got "
                     f"{experts_per_class!r}")
  assignment_YE = np.zeros((num_classes, num_experts), bool)
  for c in range(num_classes):
    assignment_YE[c, (c * experts_per_class + np.arange(experts_per_class)) % num_experts] = True
  return assignment_YE


def route_class_constrained(params: core.Params, x_TD: jax.Array,
                            bias_E: jax.Array | None = None, *, allowed_TE: jax.Array | None,
                            k: int, router_kwargs: Mapping | None = None,
                            group_size: int = 1) -> core.Routing:
  """Top-k routing by float32 logits l = x W_r, restricted to `allowed_TE` when given.

  group_size G > 1 routes runs of G consecutive tokens (an image's positions) as one: each
  token gets its run's mean logits mean_g x_g W_r, so the run shares its choices and gates.

  Without `allowed_TE` (test time) this is `routing.route_top_k`. With it (training), experts
  are selected by l + m, m_te = 0 where allowed_te else `MASKED_LOGIT` (route_top_k's
  selection bias, per token), while gates, probabilities and z-loss use the unmasked l, so the
  gates mean the same in training and test; the router's aux then adds the loss
  "class_routing" = -mean_t log sum_e allowed_te p_te, which trains the router to send tokens to
  their class's experts by itself, and the metric "router_class_accuracy" (fraction of tokens
  whose unmasked top-1 expert is allowed). A `core.RouterFn` once `allowed_TE`, k and
  router_kwargs (route_top_k's order, renormalize) are bound; `bias_E` is unused.
  """
  del bias_E
  logits_TE = x_TD.astype(jnp.float32) @ params["router_DE"].astype(jnp.float32)
  if group_size > 1:
    num_tokens, num_experts = logits_TE.shape
    mean_GE = jnp.mean(logits_TE.reshape(num_tokens // group_size, group_size, num_experts), 1)
    logits_TE = jnp.repeat(mean_GE, group_size, axis=0)
  kwargs = dict(router_kwargs or {})
  if allowed_TE is None:
    plan, aux = routing.route_top_k(logits_TE, k=k, **kwargs)
    return core.Routing(plan, logits_TE, aux)
  mask_TE = jnp.where(allowed_TE, 0.0, MASKED_LOGIT)
  plan, aux = routing.route_top_k(logits_TE, k=k, bias_E=mask_TE, **kwargs)
  allowed_prob_T = jnp.sum(aux["probs_TE"] * allowed_TE, axis=-1)
  top_T = jnp.argmax(logits_TE, axis=-1)
  aux = {**aux, "losses": {"class_routing": -jnp.mean(jnp.log(jnp.maximum(allowed_prob_T,
                                                                           1e-30)))},
         "router_class_accuracy": jnp.mean(jnp.take_along_axis(allowed_TE, top_T[:, None], 1))}
  return core.Routing(plan, logits_TE, aux)


def routing_frequency(expert_TK: jax.Array, keep_TK: jax.Array, labels_T: jax.Array,
                      num_classes: int, num_experts: int) -> jax.Array:
  """F[y, e] = (kept choices of class-y tokens that went to e) / (kept choices of class y).

  Rows of classes without tokens are 0; other rows sum to 1. `[Y, E]`.
  """
  choices_TE = jnp.sum(jax.nn.one_hot(expert_TK, num_experts) * keep_TK[..., None], axis=1)
  counts_YE = jax.nn.one_hot(labels_T, num_classes).T @ choices_TE
  return counts_YE / jnp.maximum(jnp.sum(counts_YE, axis=1, keepdims=True), 1.0)


@FFNS.register("class_constrained_moe")
class ClassConstrainedConvMoE(ConvMoE):
  """The conv MoE layer (`ConvMoE`, NHWC maps) with class-constrained routing in training.

  Called with `labels_B` (what `SmallCNN` passes when training, see `takes_labels`), each
  image's positions route within `class_expert_assignment(num_classes, num_experts,
  experts_per_class)[label]`; called without, the router is free. Experts, capacity, losses
  and aux are ConvMoE's. The router's choices are sown as "expert_TK" in the "intermediates"
  collection (kept only when that collection is mutable).

  Attributes (beyond ConvMoE's): num_classes: Y. experts_per_class: n, 1 <= n <= E, and
  k <= n. granularity: "image" (default) routes an image as one, by its positions' mean
  logits (the gate of a CNN MoE sees the whole map, as Pavlitska et al.'s), "position" each
  position alone (ConvMoE's tokens). router_loss_weight: the weight of "class_routing"
  (default 1). The router is "top_k" (router_kwargs: its order / renormalize), without jitter
  or bias_update_rate.
  """
  takes_labels: ClassVar[bool] = True
  router_loss_weight: float = 1.0
  num_classes: int = 10
  experts_per_class: int = 1
  granularity: str = "image"

  def __post_init__(self):
    if self.router != "top_k" or self.jitter or self.bias_update_rate:
      raise ValueError(f"class_constrained_moe routes with router 'top_k', no jitter and no "
                       f"bias_update_rate; got router={self.router!r}, jitter={self.jitter}, "
                       f"bias_update_rate={self.bias_update_rate}")
    class_expert_assignment(self.num_classes, self.num_experts, self.experts_per_class)
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
    if self.k > self.experts_per_class:
      raise ValueError(f"k={self.k} must be <= experts_per_class={self.experts_per_class}, or "
                       f"a token would be routed outside its class's experts")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, deterministic: bool = True,
               labels_B: jax.Array | None = None,
               router_DE: jax.Array | None = None) -> tuple[jax.Array, Aux]:
    """Returns (y_BHWC, aux), aux as MoE's; `labels_B` `[B]` ints constrain the routing."""
    del deterministic  # labels, not `deterministic`, separate training from test routing
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != self.d_model:
      raise ValueError(f"class_constrained_moe needs a 4-D (B, H, W, C) feature map with C = "
                       f"d_model = {self.d_model}, got shape {x_BHWC.shape}")
    positions = x_BHWC.shape[1] * x_BHWC.shape[2]
    allowed_TE = None
    if labels_B is not None:
      assignment_YE = jnp.asarray(class_expert_assignment(
          self.num_classes, self.num_experts, self.experts_per_class))
      allowed_TE = jnp.repeat(assignment_YE[labels_B], positions, axis=0)
    route = functools.partial(
        route_class_constrained, allowed_TE=allowed_TE, k=self.k,
        router_kwargs=self.router_kwargs,
        group_size=positions if self.granularity == "image" else 1)

    def router_fn(params, x_TD, bias_E):
      routed = route(params, x_TD, bias_E)
      self.sow("intermediates", ROUTES, routed.plan.expert_TK)
      return routed

    loss_weights = core.LossWeights(
        load_balance=self.load_balance_weight, importance=self.importance_weight,
        router_z=self.z_loss_weight, router=self.router_loss_weight)
    y_TC, aux, _ = core.moe_apply(
        ffn_params(self) | router_params(self, router_DE), x_BHWC.reshape(-1, self.d_model),
        router_fn=router_fn, expert_fn=ffn_expert_fn(self, self.k),
        capacity_factor=self.capacity_factor, capacity_multiple=self.capacity_multiple,
        priority=self.priority, loss_weights=loss_weights)
    return y_TC.reshape(x_BHWC.shape), aux
