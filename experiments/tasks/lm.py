"""The "lm" task: a byte-level Transformer LM (`config.model`) on a TFDS text dataset.

Loss: mean next-byte cross-entropy over non-PAD targets. Eval: loss (nats per byte) and bits
per byte over `config.train.eval_batches` fixed batches of the eval split; for product-key
memory layers, slot usage, access entropy and top slots over the whole eval window.
"""
import dataclasses
import functools
import math

import jax.numpy as jnp
import ml_collections

from experiments import data as data_lib
from experiments.tasks.base import TASKS
from experiments.tasks.base import Task
from experiments.tasks.base import weighted_cross_entropy
from sparsejax import masks
from sparsejax import memory
from sparsejax import models
from sparsejax import registry
from sparsejax.masks import bsr


def with_data_statistics(model_config: ml_collections.ConfigDict,
                         train_data: data_lib.WindowDataset) -> ml_collections.ConfigDict:
  """`model_config` with `model.ffn.token_frequencies="train"` replaced by the training split's
  unigram token frequencies (a tuple of VOCAB_SIZE floats), e.g. for balanced hash routing."""
  if model_config.ffn.get("token_frequencies") != "train":
    return model_config
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  counts = train_data.token_counts(data_lib.VOCAB_SIZE)
  del model_config.ffn["token_frequencies"]
  model_config.ffn.token_frequencies = tuple(float(c) for c in counts / counts.sum())
  return model_config


@TASKS.register("lm")
class LanguageModel(Task):
  """Next-byte prediction with `sparsejax.models.build_lm(config.model)`."""

  headline = ("eval/bpb",)
  unit = "tokens"
  batch_axes = ("batch", "length")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    data, train = config.data, config.train
    load = lambda split: data_lib.load_windows(data.name, split, train.seq_len,
                                               data_dir=data.data_dir, text_key=data.text_key)
    self.train_source = load(data.train_split)
    eval_data = load(data.eval_split)
    self.eval_batches = data_lib.eval_batches(eval_data, train.batch_size, train.eval_batches)
    self.model = models.build_lm(with_data_statistics(config.model, self.train_source),
                                 vocab_size=data_lib.VOCAB_SIZE)
    self.units_per_example = train.seq_len
    self.description = f"{self.train_source.summary()}; eval {eval_data.summary()}"

  @classmethod
  def check_config(cls, config):
    if config.train.seq_len > config.model.max_len:
      raise ValueError(f"config.train.seq_len={config.train.seq_len} exceeds "
                       f"config.model.max_len={config.model.max_len}")

  def init_inputs(self):
    return jnp.zeros((1, self.config.train.seq_len), jnp.int32)

  def loss(self, outputs, batch):
    nll_sum, weight_sum = weighted_cross_entropy(outputs, batch["targets"], batch["weights"])
    return nll_sum / jnp.maximum(weight_sum, 1.0), {}

  def eval_step(self, variables, batch):
    """(NLL sum, target count, memory slot histograms {layer: (reads, weight mass)})."""
    (logits, _), access = self.model.apply(variables, batch["inputs"], deterministic=True,
                                           mutable=[memory.ACCESS])
    histograms = memory.read_histograms(variables["params"], access.get(memory.ACCESS, {}))
    return (*weighted_cross_entropy(logits, batch["targets"], batch["weights"]), histograms)

  def eval_summary(self, totals):
    nll, count, histograms = totals
    loss = float(nll) / max(float(count), 1.0)
    window = memory.window_metrics(histograms, prefix="eval/")
    return {"eval/loss": loss, "eval/bpb": loss / math.log(2),
            **{k: float(v) if jnp.ndim(v) == 0 else v for k, v in window.items()}}

  def wrap_optimizer(self, tx):
    """With a block-sparse FFN (`moves_blocks`, e.g. "block_sparse"): `bsr.block_wrap`, its
    blocks moved by `config.sparsity.updater` ("static", "set", "rigl") on
    `config.sparsity.schedule` (a drop-fraction schedule; "none" = never)."""
    if not getattr(registry.FFNS.get(self.config.model.ffn.name), "moves_blocks", False):
      return tx
    sparsity = self.config.sparsity
    if sparsity.enabled:
      raise ValueError("config.sparsity.enabled=True masks dense params; a block-sparse FFN "
                       "keeps its own blocks: set it False (its updater and schedule still apply)")
    updater, schedule = sparsity.updater.to_dict(), sparsity.schedule.to_dict()
    if set(updater) != {"name"}:
      raise ValueError(f"config.sparsity.updater={updater} for a block-sparse FFN takes only "
                       f"a name, one of {bsr.BLOCK_UPDATERS}")
    name = schedule.pop("name")
    return bsr.block_wrap(tx, updater["name"],
                          None if name == "none" else masks.make_schedule(name, **schedule),
                          seed=self.config.seed)

  def active_fraction(self, path, axes):
    """Routed experts count k / num_experts ("expert" axis; k = 1 for a layer without k, such
    as hash routing; Soft MoE mixes every token into every expert), memory values the rows a
    token reads, num_heads * k of num_keys**2 ("memory" axis)."""
    setting = functools.partial(_ffn_setting, self.config.model.ffn)
    if "expert" in axes and setting("num_experts") and self.config.model.ffn.name != "soft_moe":
      return min(1.0, (setting("k") or 1) / setting("num_experts"))
    if "memory" in axes and setting("num_keys"):
      return min(1.0, setting("num_heads") * setting("k") / setting("num_keys") ** 2)
    return 1.0


def _ffn_setting(ffn: ml_collections.ConfigDict, name: str):
  """`model.ffn`'s value of `name`, else the registered layer's default (None if it has none)."""
  if name in ffn:
    return ffn[name]
  fields = {f.name: f.default for f in dataclasses.fields(registry.FFNS.get(ffn.name))}
  default = fields.get(name)
  return None if default is dataclasses.MISSING else default
