"""Mixture of experts: dispatch plans, routers, balancing, dispatch/combine, grouped matmul, layers.

Importing this package registers the routers in `ROUTERS` and the "moe" and "soft_moe" layers in
`FFNS`.
"""
from sparsejax.moe import balance
from sparsejax.moe import dispatch
from sparsejax.moe import experts
from sparsejax.moe import gmm
from sparsejax.moe import layers
from sparsejax.moe import plan
from sparsejax.moe import routing
from sparsejax.moe import soft
from sparsejax.moe.gmm import grouped_matmul
from sparsejax.moe.layers import MoE
from sparsejax.moe.layers import SoftMoE
from sparsejax.moe.plan import DispatchPlan
