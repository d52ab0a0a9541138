"""Activation sparsity: neuron statistics, top-k / predicted sparse FFNs, probes, patching.

Importing the package registers its layers (FFNs, attentions) in `sparsejax.registry`.
"""
from sparsejax.activations.head_routing import (  # noqa: F401
    HeadRoutedAttention, head_routed_decode, router_loss, router_recall, select_heads)
from sparsejax.activations.structured_ffn import (  # noqa: F401
    NMActivationFFN, RSparseFFN, lowrank_factors, nm_activation_mask, nm_linear, nm_pack,
    prepare_inference, rsparse_linear)
from sparsejax.activations.token_sparsity import (  # noqa: F401
    TokenSparseBlock, select_top, select_windows, token_sparse_apply, window_merge,
    window_partition, window_scores, window_sparse_apply)
from sparsejax.activations.sparse_ffn import (  # noqa: F401
    PredictedFFN, TopKFFN, gathered_ffn, gathered_hidden, gathered_params, predicted_ffn,
    predicted_ffn_gathered, predictor_loss, predictor_scores, topk_ffn, topk_ffn_gathered)
from sparsejax.activations.stats import (  # noqa: F401
    NeuronStats, bigram_buckets, collect_neuron_stats, init_neuron_stats, json_summary,
    load_stats, merge_neuron_stats, save_stats, summarize, update_neuron_stats)
from sparsejax.activations.probes import (  # noqa: F401
    SparseProbe, byte_labels, fit_logistic, fit_sparse_probe, probe_accuracy, probe_dataset,
    probe_logits, score_neurons, select_neurons)
from sparsejax.activations.patching import (  # noqa: F401
    cross_entropy_metric, logit_diff_metric, patch, patching_sweep)
from sparsejax.activations.perturbations import (  # noqa: F401
    input_perturbation, power_iteration, site_perturbation)
