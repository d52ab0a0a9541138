"""Experiments: the trainer, its configs, data pipelines and benchmarks."""
