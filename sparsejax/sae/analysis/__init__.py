"""Dictionary analysis for trained SAEs: pure functions over params dicts, latents and logits.

- matching: `match_features` (Hungarian matching of decoder atoms: seed variance, universality),
  `fold_parameters` / `sae_match` / `match_layers` (SAE Match across layers), `permute_latents`.
- similarity: `svcca` between two activation sets on the same tokens.
- geometry: `pairwise_cosine_stats`, `nearest_neighbour_cosines`, `spherical_kmeans` of atoms.
- contexts: `top_activating_contexts` of a latent on a token stream, the `polysemy` probe.
- interventions: `attribute_latents` (attribution patching / integrated gradients),
  `steer_fn` and `steering_effect`.
- unlearning: CRISP's `feature_stats`, `select_crisp_features` and `crisp_loss`.
- codes: CSR's `sparse_codes` at several k and their `retrieval_accuracy`.

Only the param names of the SAE contract are read ("W_enc", "b_enc", "W_dec", "b_dec",
"log_threshold", "W_skip"); where an encoder is needed the caller passes the latents.
"""
from sparsejax.sae.analysis.codes import retrieval_accuracy, sparse_codes  # noqa: F401
from sparsejax.sae.analysis.contexts import polysemy, top_activating_contexts  # noqa: F401
from sparsejax.sae.analysis.geometry import (  # noqa: F401
    nearest_neighbour_cosines, pairwise_cosine_stats, spherical_kmeans, spherical_kmeans_step)
from sparsejax.sae.analysis.interventions import (  # noqa: F401
    attribute_latents, steer_fn, steering_effect)
from sparsejax.sae.analysis.matching import (  # noqa: F401
    cosine_matrix, fold_parameters, match_features, match_layers, permute_latents, sae_match)
from sparsejax.sae.analysis.similarity import svcca  # noqa: F401
from sparsejax.sae.analysis.unlearning import (  # noqa: F401
    crisp_loss, feature_stats, select_crisp_features)
