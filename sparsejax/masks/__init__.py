"""Weight sparsity: mask pytrees, structures, distributions, schedules, updaters, optax wrapper,
export to compressed layouts. See `sparsejax/masks/mask.py` for the `Mask` type."""
from sparsejax.masks.mask import (DENSE, Mask, check_mask_matches, is_box, leaf_paths,
                                  leaves_by_path, map_param_like, match_rules, path_str)
from sparsejax.masks.structures import (parse_structure, pattern, select, structure_count,
                                        structure_name)
from sparsejax.masks.distributions import layer_densities, leaf_structures, make_mask
from sparsejax.masks.init import (MaskInit, accumulate_grads, accumulate_sq_grads, init_inputs,
                                  init_needs, register_init)
from sparsejax.masks.oneshot import sparsegpt_prune, wanda_prune
from sparsejax.masks.cospadi import (cospadi_atoms_for_budget, cospadi_compress,
                                     cospadi_param_count)
from sparsejax.masks.export import (from_bsr, from_condensed, restore_sparse, save_sparse, to_bsr,
                                    to_condensed)
from sparsejax.masks.condensed import CondensedLinear, condensed_matmul, prepare_inference
from sparsejax.masks.formats import (CSR, Bitmap, bitmap_matmul, csr_matmul, from_bitmap,
                                     from_csr, to_bitmap, to_csr)
from sparsejax.masks.pixelfly import PixelflyLinear, pixelfly_blocks, pixelfly_pattern
from sparsejax.masks.monarch import (MonarchLinear, monarch_dense, monarch_matmul,
                                     monarch_shapes)
from sparsejax.masks.sparse_ift import SparseIFTLayer, sparse_ift_layer, sparse_ift_width
from sparsejax.masks.schedules import Constant, Cosine, OneShot, Polynomial, Schedule, make_schedule
from sparsejax.masks.updaters import (NMPGF, NMSRSTE, SET, GroupLasso, HyperSparse, LeafInputs,
                                      Magnitude, MaskUpdate, RigL, SparseMomentum, SRigL,
                                      UpdateInputs, Updater, leaf_inputs, make_updater)
from sparsejax.masks.wrap import WrapState, get_mask, masked, wrap
from sparsejax.masks.sam_on import sam, sam_gradient, sam_perturbation
from sparsejax.masks.acdc_training import ACDC, ACDCPhases, acdc, reset_on_schedule, rewind_lr
from sparsejax.masks.relevance import GReg, greg_grad, relevance_decay
from sparsejax.masks.layer_lottery import (block_scores, blocks_to_drop, drop_blocks,
                                           kept_layer_indices)
from sparsejax.masks.dass import DassResult, dass_search, discretise, relaxed_mask
from sparsejax.masks.safs import SAFSMLP, UNARY_OPERATORS, lahc_search, safs_activation
