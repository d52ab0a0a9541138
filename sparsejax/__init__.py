"""sparsejax: sparse neural networks in JAX/Flax.

Importing the package imports its layer modules, so every layer is registered in
`sparsejax.registry` before a config names it.
"""
from sparsejax import models  # noqa: F401 (imported to register its layers)
from sparsejax import attention  # noqa: F401
from sparsejax import memory  # noqa: F401
from sparsejax import moe  # noqa: F401
from sparsejax import sae  # noqa: F401
from sparsejax import activations  # noqa: F401
from sparsejax import coding  # noqa: F401
from sparsejax.masks import bsr  # noqa: F401 (the "block_sparse" FFN)
from sparsejax.auxiliary import total_aux_loss  # noqa: F401 (public helper)

__version__ = "0.1.0"
