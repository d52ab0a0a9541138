"""Experiment configs: python files with `get_config()` returning an ml_collections ConfigDict."""
