"""Which config differences stop a resume (`run_config.config_changes`)."""
import json

from experiments import run_config
from experiments.configs import base


def _saved_and_current():
  saved = json.loads(base.get_config().to_json())
  return saved, json.loads(base.get_config().to_json())


def test_a_resumable_field_may_change_and_a_structural_one_may_not():
  saved, current = _saved_and_current()
  current["train"]["num_steps"] = saved["train"]["num_steps"] + 100
  assert run_config.config_changes(saved, current) == []
  current["model"]["num_layers"] = saved["model"]["num_layers"] + 1
  assert run_config.config_changes(saved, current) == [
      f"model.num_layers: {saved['model']['num_layers']!r} -> "
      f"{saved['model']['num_layers'] + 1!r}"]


def test_a_key_added_since_the_run_started_counts_as_its_default():
  saved, current = _saved_and_current()
  del saved["forecast"]  # a workdir written before the "forecast" section existed
  assert run_config.config_changes(saved, current) == []
  current["forecast"]["patch_size"] = 4
  assert run_config.config_changes(saved, current) == ["forecast.patch_size: 8 -> 4"]


def test_a_free_form_key_the_saved_run_lacks_is_not_its_base_default():
  saved, current = _saved_and_current()
  del saved["sae"]["dictionary"]["k"]  # the layer's own default applied, not base's k=16
  assert run_config.config_changes(saved, current) == ["sae.dictionary.k: '(absent)' -> 16"]
