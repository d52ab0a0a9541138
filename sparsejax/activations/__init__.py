"""Activation sparsity: neuron statistics, top-k / predicted sparse FFNs, probes, patching.

Importing the package registers its layers (FFNs, attentions) in `sparsejax.registry`.
"""
