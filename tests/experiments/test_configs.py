"""Every shipped config passes the trainer's key check and builds and traces its model."""
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data
from experiments import trainer
from sparsejax import models

CONFIGS = sorted(p for p in (pathlib.Path(trainer.__file__).parent / "configs").glob("*.py")
                 if p.name != "__init__.py")


def test_every_config_is_listed():
  names = {p.stem for p in CONFIGS}
  assert {"base", "lm_dense", "moe_lm", "moe_lm_hash", "moe_lm_upcycle", "moe_lm_soft",
          "moe_lm_expert_choice", "pkm_lm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_model(path):
  config = runpy.run_path(str(path))["get_config"]()
  trainer.check_config(config)
  model_config = config.model
  if model_config.ffn.get("token_frequencies") == "train":
    model_config = trainer.with_data_statistics(model_config, _UniformCounts())
  model = models.build_lm(model_config, vocab_size=data.VOCAB_SIZE)
  tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  logits, aux = jax.eval_shape(lambda v: model.apply(v, tokens), variables)
  assert logits.shape == (1, config.train.seq_len, data.VOCAB_SIZE)
  assert set(aux) == {"losses", "metrics"}


class _UniformCounts:
  """Stands in for the training split when a config asks for its token frequencies."""

  def token_counts(self, vocab_size):
    return np.ones(vocab_size)
