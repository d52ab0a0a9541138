"""The "classify" task: a registered classifier (`config.classifier`) on a classification dataset.

Data: scikit-learn's bundled 8x8 digits (`data.name="digits"`) or a prepared TFDS image dataset
(`experiments.data.images`). Loss: mean cross-entropy. Eval: loss and accuracy over every
example of the eval split once.
"""
import jax.numpy as jnp

from experiments import data as data_lib
from experiments.tasks.base import TASKS
from experiments.tasks.base import Task
from experiments.tasks.base import weighted_cross_entropy
from sparsejax import models


@TASKS.register("classify")
class Classify(Task):
  """Classification with `sparsejax.models.build_classifier(config.classifier)`."""

  headline = ("eval/accuracy",)
  unit = "examples"
  batch_axes = ("batch",)

  def __init__(self, config):
    super().__init__(config)
    data = config.data
    if data.name == data_lib.digits.NAME:
      load = data_lib.digits.load_digits
      num_classes = data_lib.digits.NUM_CLASSES
    else:
      load = lambda split: data_lib.images.load_images(data.name, split, data_dir=data.data_dir)
      num_classes = data_lib.images.num_classes(data.name, data_dir=data.data_dir)
    self.train_source = load(data.train_split)
    eval_data = load(data.eval_split)
    self.eval_batches = data_lib.digits.eval_batches(eval_data, config.train.batch_size)
    self.model = models.build_classifier(config.classifier, num_classes)
    self.description = (f"{self.train_source.summary()}; eval {eval_data.summary()}; "
                        f"{num_classes} classes")

  def apply(self, variables, batch, **kwargs):
    """The model on `batch`; a model that `takes_labels` also gets the targets as `labels_B`
    when training (not deterministic), e.g. for class-constrained routing."""
    if getattr(self.model, "takes_labels", False) and not kwargs.get("deterministic", True):
      kwargs["labels_B"] = batch["targets"]
    return self.model.apply(variables, batch["inputs"], **kwargs)

  def init_inputs(self):
    return jnp.zeros((1, self.train_source.inputs.shape[1]))

  def loss(self, outputs, batch):
    nll_sum, count = weighted_cross_entropy(outputs, batch["targets"], batch["weights"])
    return nll_sum / jnp.maximum(count, 1.0), {}

  def eval_step(self, variables, batch):
    """(NLL sum, example count, correct count)."""
    logits, _ = self.model.apply(variables, batch["inputs"], deterministic=True)
    nll, count = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch["targets"]) * batch["weights"])
    return nll, count, correct

  def eval_summary(self, totals):
    nll, count, correct = (float(t) for t in totals)
    return {"eval/loss": nll / max(count, 1.0), "eval/accuracy": correct / max(count, 1.0)}
