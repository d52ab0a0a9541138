"""Mixture of experts: dispatch plans, routers, balancing, dispatch/combine, experts, layers.

`core.moe_apply` is the token-routed layer as one pure function (route -> capacity -> experts
-> aux) into which the layers plug a router function and an expert function. Dropless experts
run on `kernels.gmm`, the grouped matmul.

Importing this package registers the routers in `ROUTERS` and the "moe", "soft_moe",
"hash_moe", "lora_moe" (LoRA experts over a shared FFN) and "conv_moe" (NHWC feature maps)
layers in `FFNS`. `upcycle.upcycle_params` turns a dense LM's params into an MoE LM's.
`parallel` runs the MoE layer's experts expert-parallel over a device mesh (all_to_all).
"""
from sparsejax.moe import assignment
from sparsejax.moe import balance
from sparsejax.moe import conv
from sparsejax.moe import core
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import hash_layer
from sparsejax.moe import layers
from sparsejax.moe import lora_experts
from sparsejax.moe import parallel
from sparsejax.moe import plan
from sparsejax.moe import routing
from sparsejax.moe import soft
from sparsejax.moe import upcycle
from sparsejax.moe.conv import ConvMoE
from sparsejax.moe.core import moe_apply
from sparsejax.moe.hash_layer import HashMoE
from sparsejax.moe.layers import MoE
from sparsejax.moe.layers import SoftMoE
from sparsejax.moe.lora_experts import LoRAMoE
from sparsejax.moe.plan import DispatchPlan
from sparsejax.moe.upcycle import upcycle_params
