"""Kernels: each has a pure-jnp dense reference beside it, Pallas kernels (TPU Mosaic, GPU Triton)
with an interpret mode for CPU tests, a fast XLA implementation for CPU, and a `custom_vjp`.

  kernels.gmm                  gmm, tgmm: grouped matmul and its transpose (dropless MoE)
  kernels.block_sparse         block_sparse_matmul: x W with W stored as its nonzero blocks
  kernels.block_sparse_linear  BlockSparseLinear: the Flax layer on top of it
  kernels.block_schedule       build_block_schedule: host-side schedule of a block mask
  kernels.block_sparse_attention  block_sparse_attention: attention over scheduled key blocks
  kernels.backend              implementation="auto" | "pallas" | "xla" | "reference"

Import from the modules (`from kernels.gmm import gmm`); the package re-exports nothing, so
`kernels.gmm` stays the module.
"""
