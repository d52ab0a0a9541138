"""Sparse autoencoders and transcoders: ReLU (L1), TopK, BatchTopK, JumpReLU and fixed-threshold
dictionaries, Matryoshka prefixes, AuxK, OrtSAE orthogonality, skip transcoders.

`core.sae_apply(params, x_TD, config, state=...)` is the whole dictionary as a pure function;
`layers.SparseAutoencoder` is the Linen module over it. `config.SAEConfig` holds every setting
(checked once); `initializers` has the tied / active-subspace inits and the latent state;
`penalties` the penalty terms and `quasi_orthogonal_k`; `activations` the JumpReLU
straight-through functions and the top-k selections; `training` the unit-norm decoder constraint
(an optax transform) and input scaling; `metrics` L0, FVU, CE recovered, dead / dense latents;
`analysis` feature matching, SVCCA, atom geometry, top contexts, attribution, steering, CRISP,
polysemy and CSR codes; `export` SAELens-layout safetensors.
"""
from sparsejax.sae import activations
from sparsejax.sae import analysis
from sparsejax.sae import config
from sparsejax.sae import core
from sparsejax.sae import export
from sparsejax.sae import initializers
from sparsejax.sae import layers
from sparsejax.sae import metrics
from sparsejax.sae import penalties
from sparsejax.sae import training
from sparsejax.sae.config import SAEConfig
from sparsejax.sae.core import batchtopk_to_jumprelu
from sparsejax.sae.core import decode
from sparsejax.sae.core import encode
from sparsejax.sae.core import sae_apply
from sparsejax.sae.initializers import init_active_subspace
from sparsejax.sae.initializers import init_params
from sparsejax.sae.initializers import init_state
from sparsejax.sae.layers import SparseAutoencoder
from sparsejax.sae.penalties import quasi_orthogonal_k
