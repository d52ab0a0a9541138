"""Every shipped config passes the trainer's key check and builds and traces its model."""
import pathlib
import runpy

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data
from experiments import run_config
from experiments import tasks
from experiments import trainer
from sparsejax import masks
from sparsejax import models

CONFIGS = sorted(p for p in (pathlib.Path(trainer.__file__).parent / "configs").glob("*.py")
                 if p.name != "__init__.py")


def test_every_config_is_listed():
  names = {p.stem for p in CONFIGS}
  assert {"base", "lm_dense", "moe_lm", "moe_lm_hash", "moe_lm_upcycle", "moe_lm_soft",
          "moe_lm_expert_choice", "pkm_lm", "sparse_mlp", "sparse_lm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_model(path):
  config = runpy.run_path(str(path))["get_config"]()
  run_config.check_config(config, tasks.TASKS)
  if config.task == "classify":
    _check_classifier(config)
    return
  if config.task not in ("lm", "sae"):
    _check_task_model(config)
    return
  model_config = config.model
  if model_config.ffn.get("token_frequencies") == "train":
    model_config = tasks.lm.with_data_statistics(model_config, _UniformCounts())
  model = models.build_lm(model_config, vocab_size=data.VOCAB_SIZE)
  tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  logits, aux = jax.eval_shape(lambda v: model.apply(v, tokens), variables)
  assert logits.shape == (1, config.train.seq_len, data.VOCAB_SIZE)
  assert set(aux) == {"losses", "metrics"}
  _check_sparsity(config, variables)


def _check_classifier(config):
  """The classifier traces on a digits batch and its sparsity settings are valid."""
  model = models.build_classifier(config.classifier, data.digits.NUM_CLASSES)
  x = jnp.zeros((1, data.digits.NUM_FEATURES))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  logits, aux = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert logits.shape == (1, data.digits.NUM_CLASSES) and set(aux) == {"losses", "metrics"}
  _check_sparsity(config, variables)


def _check_task_model(config):
  """Any other task: its model traces on the task's own init inputs (builds the task's data)."""
  task = tasks.build_task(config)
  inputs = task.init_inputs()
  variables = jax.eval_shape(task.model.init, jax.random.PRNGKey(0), inputs)
  _, aux = jax.eval_shape(lambda v: task.model.apply(v, inputs), variables)
  assert set(aux) == {"losses", "metrics"}
  _check_sparsity(config, variables)


def _check_sparsity(config, variables):
  """A sparse config's rules give every param a density (`layer_densities` on the shapes)."""
  if not config.sparsity.enabled:
    return
  params = flax.linen.meta.unbox(variables)["params"]
  densities = masks.layer_densities(params, config.sparsity.density, config.sparsity.distribution,
                                    power=config.sparsity.erk_power, rules=config.sparsity.rules)
  assert set(densities) == set(masks.leaf_paths(params))


class _UniformCounts:
  """Stands in for the training split when a config asks for its token frequencies."""

  def token_counts(self, vocab_size):
    return np.ones(vocab_size)
