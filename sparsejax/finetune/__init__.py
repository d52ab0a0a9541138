"""Sparse fine-tuning: which parameters (or which basis directions) an update may touch.

  sparsegrad     SparseGrad: top-fraction updates of MLP kernels in a basis fitted to their
                 gradients (HOSVD), an optax transformation.
  kernel_select  choose the weights to tune by their share of the empirical NTK, with bi-level
                 (across / inside layers) competition; train them with `masks.wrap.masked`.
  fused          FUSED: critical-layer ranking, removable low-rank unlearning adapters.
"""
from sparsejax.finetune import fused
from sparsejax.finetune import kernel_select
from sparsejax.finetune import sparsegrad
from sparsejax.finetune.fused import (
    attach,
    init_adapters,
    layer_sensitivity,
    make_unlearning_step,
    rank_layers,
)
from sparsejax.finetune.kernel_select import allocate_budget, competition_mask, ntk_scores
from sparsejax.finetune.sparsegrad import fit_basis, fit_bases, sparsegrad_update

__all__ = [
    "allocate_budget",
    "attach",
    "competition_mask",
    "fit_basis",
    "fit_bases",
    "fused",
    "init_adapters",
    "kernel_select",
    "layer_sensitivity",
    "make_unlearning_step",
    "ntk_scores",
    "rank_layers",
    "sparsegrad",
    "sparsegrad_update",
]
