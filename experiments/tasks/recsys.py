"""The "recsys" task: a click model (`config.classifier`, e.g. "dlrm") on synthetic click data.

Data: `experiments.data.synthetic_clicks` (`data.name="synthetic_clicks"`; splits "train" and
"test"): bags of raw categorical ids per field, a click label per example. Loss: mean binary
cross-entropy of the click logit (log-loss). Eval over every example of the eval split once:
log-loss, accuracy at p = 0.5, mean predicted CTR and ROC AUC, the AUC from per-class
histograms of the predicted probability over AUC_BINS equal bins (pairs in one bin count one
half, so it is exact up to ties within 1 / AUC_BINS). Sparse tables train through the generic
`config.sparsity` (mask rules on "table_<f>").
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import digits
from experiments.data import synthetic_clicks
from experiments.tasks.base import TASKS
from experiments.tasks.base import Task
from sparsejax import models

AUC_BINS = 4096


def click_histograms(logits_B: jax.Array, clicks_B: jax.Array, weights_B: jax.Array,
                     num_bins: int = AUC_BINS) -> tuple[jax.Array, jax.Array]:
  """(positives, negatives) per bin floor(sigmoid(logit) * num_bins) (clipped), weighted."""
  bins_B = jnp.clip(jnp.floor(jax.nn.sigmoid(logits_B.astype(jnp.float32)) * num_bins),
                    0, num_bins - 1).astype(jnp.int32)
  clicks_B = clicks_B.astype(jnp.float32)
  pos = jnp.zeros(num_bins, jnp.float32).at[bins_B].add(weights_B * clicks_B)
  neg = jnp.zeros(num_bins, jnp.float32).at[bins_B].add(weights_B * (1.0 - clicks_B))
  return pos, neg


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float:
  """AUC = sum_i pos_i (sum_{j<i} neg_j + neg_i / 2) / (P N) over ascending score bins;
  NaN when a class is missing."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  total_pos, total_neg = pos.sum(), neg.sum()
  if total_pos == 0 or total_neg == 0:
    return float("nan")
  below = np.cumsum(neg) - neg
  return float(np.sum(pos * (below + neg / 2.0)) / (total_pos * total_neg))


def _click_logits(outputs):
  return outputs[..., 0]


@TASKS.register("recsys")
class ClickThrough(Task):
  """Click prediction with `sparsejax.models.build_classifier(config.classifier, 1)`."""

  headline = ("eval/auc", "eval/logloss")
  unit = "examples"
  batch_axes = ("batch",)

  def __init__(self, config):
    super().__init__(config)
    data = config.data
    self.train_source = synthetic_clicks.load_clicks(data.train_split)
    eval_data = synthetic_clicks.load_clicks(data.eval_split)
    self.eval_batches = digits.eval_batches(eval_data, config.train.batch_size)
    self.model = models.build_classifier(config.classifier, num_classes=1)
    self.description = (f"{self.train_source.summary()}; eval {eval_data.summary()}; planted "
                        f"model's eval AUC {synthetic_clicks.oracle_auc(data.eval_split):.4f}")

  @classmethod
  def check_config(cls, config):
    if config.data.name != synthetic_clicks.NAME:
      raise ValueError(f"task 'recsys' reads config.data.name={synthetic_clicks.NAME!r}, got "
                       f"{config.data.name!r}")

  def init_inputs(self):
    return jnp.zeros((1, *self.train_source.inputs.shape[1:]), jnp.int32)

  def loss(self, outputs, batch):
    nll_B = optax.sigmoid_binary_cross_entropy(_click_logits(outputs).astype(jnp.float32),
                                               batch["targets"].astype(jnp.float32))
    weights = batch["weights"]
    return jnp.sum(nll_B * weights) / jnp.maximum(jnp.sum(weights), 1.0), {}

  def eval_step(self, variables, batch):
    """(log-loss sum, example count, correct count, predicted CTR sum, AUC histograms)."""
    outputs, _ = self.model.apply(variables, batch["inputs"], deterministic=True)
    logits_B = _click_logits(outputs).astype(jnp.float32)
    clicks_B, weights_B = batch["targets"].astype(jnp.float32), batch["weights"]
    nll = jnp.sum(optax.sigmoid_binary_cross_entropy(logits_B, clicks_B) * weights_B)
    correct = jnp.sum(((logits_B > 0) == (clicks_B > 0.5)) * weights_B)
    predicted = jnp.sum(jax.nn.sigmoid(logits_B) * weights_B)
    return (nll, jnp.sum(weights_B), correct, predicted,
            click_histograms(logits_B, clicks_B, weights_B))

  def eval_summary(self, totals):
    nll, count, correct, predicted, (pos, neg) = totals
    count = max(float(count), 1.0)
    return {"eval/logloss": float(nll) / count, "eval/accuracy": float(correct) / count,
            "eval/predicted_ctr": float(predicted) / count, "eval/ctr": float(pos.sum()) / count,
            "eval/auc": histogram_auc(pos, neg)}
