"""Weight sparsity: mask pytrees, structures, distributions, schedules, updaters, optax wrapper,
export to compressed layouts. See `sparsejax/masks/mask.py` for the `Mask` type."""
from sparsejax.masks.mask import DENSE, Mask, check_mask_matches, leaf_paths, match_rules, path_str
