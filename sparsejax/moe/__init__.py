"""Mixture of experts: dispatch plans, routers, balancing, dispatch/combine, experts, layers.

`core.moe_apply` is the token-routed layer as one pure function (route -> capacity -> experts
-> aux) into which the layers plug a router function and an expert function. Dropless experts
run on `kernels.gmm`, the grouped matmul.

Importing this package registers the routers in `ROUTERS` and the "moe", "soft_moe",
"hash_moe", "lora_moe" (LoRA experts over a shared FFN), "adapter_moe" (PESC's bottleneck
adapters over a shared FFN), "finedeep" (stacked sub-layers of fine-grained dense experts),
"conv_moe" (NHWC feature maps) and "class_constrained_moe" (conv MoE routed within each class's
experts while training) layers in `FFNS`. `upcycle.upcycle_params` turns a dense LM's params
into an MoE LM's. `parallel` runs the MoE layer's experts expert-parallel over a device mesh
(all_to_all); `fssdp` runs them fully sharded, materialising only the experts a step uses (Hecate).
`token_moe` registers the attention-free token mixers "token_mlp" (gMLP) and "token_moe" (sMLP's
sMoE: feature chunks routed to spatial experts) in `ATTENTIONS`.
"""
from sparsejax.moe import adapter_experts
from sparsejax.moe import assignment
from sparsejax.moe import balance
from sparsejax.moe import class_constrained
from sparsejax.moe import conv
from sparsejax.moe import core
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import finedeep
from sparsejax.moe import fssdp
from sparsejax.moe import hash_layer
from sparsejax.moe import layers
from sparsejax.moe import lora_experts
from sparsejax.moe import parallel
from sparsejax.moe import plan
from sparsejax.moe import routing
from sparsejax.moe import soft
from sparsejax.moe import token_moe
from sparsejax.moe import upcycle
from sparsejax.moe.adapter_experts import AdapterMoE
from sparsejax.moe.class_constrained import ClassConstrainedConvMoE
from sparsejax.moe.conv import ConvMoE
from sparsejax.moe.core import moe_apply
from sparsejax.moe.finedeep import Finedeep
from sparsejax.moe.hash_layer import HashMoE
from sparsejax.moe.layers import MoE
from sparsejax.moe.layers import SoftMoE
from sparsejax.moe.lora_experts import LoRAMoE
from sparsejax.moe.plan import DispatchPlan
from sparsejax.moe.upcycle import upcycle_params
