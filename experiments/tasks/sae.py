"""The "sae" task: a sparse autoencoder (or transcoder) on the activations of a trained LM.

The LM: `sae.lm_workdir` holds a finished LM run (its `config.json` and checkpoints). When it
holds none, or an unfinished one, the LM of `sae.lm_config` (or of the workdir's own
`config.json`) is trained there first, resuming what is there; with several processes it must
already be finished.

Data: the activations at the sites `sae.sites` (patterns over `sparsejax.sites` paths, e.g.
"layer_1/resid_post", "layer_1/attention/heads"; a pattern matching several sites trains one SAE
shared by that layer group) on `sae.harvest_tokens` tokens of seeded training windows, harvested
once and scaled by s so that E||s x|| = sqrt(D) (SAELens's input normalisation; divide by s, or
fold it into the weights with `sparsejax.sae.export.fold_input_scale`, to use raw activations).
With `sae.cache_dir` they are written there as array_record and read back by later runs. A
transcoder sets `sae.target_sites` (e.g. "layer_1/ffn/out"): it reads `sae.sites` and predicts
those. The dictionary is `sparsejax.sae.SAEConfig(**sae.dictionary)`.

Loss: the normalised reconstruction error sum (x_hat - x)^2 / sum (x - mean x)^2 (FVU) plus the
SAE's own penalties (its aux losses); with `sae.unit_norm_decoder` the decoder rows stay unit
norm (gradient projection chained after the optimizer). Eval, on LM windows of the eval split
(`sae.eval_windows` per batch): FVU, explained variance, L0, the fraction of latents that never
fire on the eval tokens, and the LM's cross-entropy with the sites spliced by the SAE's
reconstruction: CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), CE_zero with the sites
zero-ablated, and the KL from the clean next-token distribution.
"""
import functools
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import checkpoints as ckpt_lib
from experiments import data as data_lib
from experiments import run_config
from experiments.data import activations as activations_lib
from experiments.tasks.base import TASKS
from experiments.tasks.base import Task
from experiments.tasks.base import weighted_cross_entropy
from sparsejax import models
from sparsejax import sites as sites_lib
from sparsejax.sae import core as sae_core
from sparsejax.sae import initializers as sae_initializers
from sparsejax.sae import layers as sae_layers
from sparsejax.sae import metrics as sae_metrics
from sparsejax.sae import training as sae_training

HARVEST_WINDOWS = 32  # LM windows per harvesting forward pass
INIT_SAMPLE = 4096  # training rows the data-dependent init looks at
# The setting that makes each non-top-k kind sparse (their SAEConfig defaults are 0).
PENALTIES = {"relu": "l1_coeff", "jumprelu": "l0_coeff", "threshold": "threshold"}
INITS = {"tied": sae_initializers.init_params,
         "active_subspace": sae_initializers.init_active_subspace}


@TASKS.register("sae")
class SparseAutoencoderTask(Task):
  """Trains `sparsejax.sae.SparseAutoencoder` on LM activations; see the module docstring."""

  headline = ("eval/fvu", "eval/l0", "eval/dead_fraction", "eval/ce_recovered")
  unit = "tokens"
  batch_axes = ("batch",)

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    sae = config.sae
    self.lm_config, self.lm_variables = load_lm(sae.lm_workdir, sae.lm_config)
    self.lm = models.build_lm(self.lm_config.model, vocab_size=data_lib.VOCAB_SIZE)
    data = self.lm_config.data
    load = lambda split: data_lib.load_windows(data.name, split, self.lm_config.train.seq_len,
                                               data_dir=data.data_dir, text_key=data.text_key)
    train_windows, eval_windows = load(data.train_split), load(data.eval_split)
    self.input_sites, self.target_sites = self._match_sites(train_windows[0]["inputs"])
    inputs, targets = self._harvest_or_load(train_windows)
    self.input_scale = float(sae_training.activation_scale(inputs))
    self.target_scale = (self.input_scale if targets is None
                         else float(sae_training.activation_scale(targets)))
    self.train_source = activations_lib.ArrayActivations(
        inputs * self.input_scale, None if targets is None else targets * self.target_scale)
    self.eval_batches = data_lib.eval_batches(eval_windows, sae.eval_windows,
                                              config.train.eval_batches)
    self.sae_config = sae_core.SAEConfig(
        d_in=inputs.shape[1], **({} if targets is None else {"d_out": targets.shape[1]}),
        **sae.dictionary.to_dict())
    self.model = sae_layers.SparseAutoencoder(
        config=self.sae_config, initializer=self._initializer(self.train_source))
    self.description = (f"{self.train_source.summary()} at {', '.join(self.input_sites)}"
                        f"{' -> ' + ', '.join(self.target_sites) if self.target_sites else ''}"
                        f" of the LM in {sae.lm_workdir}; eval {eval_windows.summary()}")

  def _initializer(self, source: activations_lib.ArrayActivations):
    """Params from `INIT_SAMPLE` seeded training rows (of every site): geometric-median b_dec,
    and with `sae.init="active_subspace"` decoder atoms inside the data's principal subspace."""
    rows = np.random.default_rng(self.config.seed).permutation(len(source))[:INIT_SAMPLE]
    targets = None if source.targets is None else source.targets[np.sort(rows)]
    return functools.partial(INITS[self.config.sae.init], config=self.sae_config,
                             data_TD=source.inputs[np.sort(rows)], target_TD=targets)

  @classmethod
  def check_config(cls, config):
    sae = config.sae
    if not sae.sites:
      raise ValueError("config.sae.sites is empty; name the activation sites to train on, e.g. "
                       "'layer_1/resid_post'")
    if sae.lm_workdir is None:
      raise ValueError("config.sae.lm_workdir is None; give a directory holding (or to hold) the "
                       "LM run, e.g. /tmp/sparsejax_lm")
    if sae.harvest_tokens < config.train.batch_size:
      raise ValueError(f"config.sae.harvest_tokens={sae.harvest_tokens} is less than one batch "
                       f"(config.train.batch_size={config.train.batch_size})")
    if sae.init not in INITS:
      raise ValueError(f"config.sae.init={sae.init!r}; allowed: {', '.join(INITS)}")
    kind = sae.dictionary.get("kind", "topk")
    penalty = PENALTIES.get(kind)
    if penalty and not sae.dictionary.get(penalty, 0) > 0:
      raise ValueError(f"config.sae.dictionary.kind={kind!r} needs {penalty} > 0 (its "
                       f"sparsity), e.g. --config.sae.dictionary.{penalty}=0.01")
    if "d_in" in sae.dictionary or "d_out" in sae.dictionary:
      raise ValueError("config.sae.dictionary may not set d_in / d_out: the sites' widths set them")

  def init_inputs(self):
    return jnp.zeros((1, self.sae_config.d_in))

  def apply(self, variables, batch, **kwargs):
    return self.model.apply(variables, batch["inputs"], target_TD=batch.get("targets"), **kwargs)

  def loss(self, outputs, batch):
    fvu = sae_metrics.fvu(outputs, batch.get("targets", batch["inputs"]))
    return fvu, {"fvu": fvu}

  def wrap_optimizer(self, tx):
    if not self.config.sae.unit_norm_decoder:
      return tx
    return optax.chain(tx, sae_training.unit_norm_decoder())

  def active_fraction(self, path, axes):
    """A top-k kind reads k of the N decoder rows per token."""
    if "W_dec" in path and self.sae_config.kind in ("topk", "batchtopk"):
      return self.sae_config.k / self.sae_config.num_latents
    return 1.0

  def eval_step(self, variables, batch):
    """Sums over LM windows: reconstruction moments, L0 and firing counts (PAD positions left
    out), and NLL / KL sums of the clean, SAE-spliced and zero-ablated LM."""
    tokens, weights_T = batch["inputs"], batch["weights"].reshape(-1)
    (clean_logits, _), captured = sites_lib.collect(
        self.lm, self.lm_variables, tokens, sites=self._all_sites(), deterministic=True)
    state = variables.get(sae_layers.STATS)
    predict = lambda x_TD: sae_core.sae_apply(variables["params"], x_TD * self.input_scale,
                                              self.sae_config, state=state)[:2]
    moments, transcoded = [], {}
    for source, target in self._site_pairs():
      y_BT_ = captured[target or source]
      y_hat_TD, acts_TN = predict(_rows_of(captured[source], self.sae_config.d_in))
      moments.append(_moments(y_hat_TD, _rows_of(y_BT_) * self.target_scale, acts_TN, weights_T))
      if target:
        transcoded[target] = (y_hat_TD / self.target_scale).reshape(y_BT_.shape).astype(y_BT_.dtype)

    def reconstruct(x_BT_):  # the SAE on what arrives at the site, so spliced errors compound
      y_hat_TD = predict(_rows_of(x_BT_, self.sae_config.d_in))[0] / self.target_scale
      return y_hat_TD.reshape(x_BT_.shape).astype(x_BT_.dtype)

    spliced = ({path: (lambda _, value=value: value) for path, value in transcoded.items()}
               if transcoded else {path: reconstruct for path in self.input_sites})
    zeroed = {path: jnp.zeros_like for path in spliced}
    nll = lambda logits: weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    run = lambda fns: sites_lib.splice(self.lm, self.lm_variables, tokens, fns=fns,
                                       deterministic=True)[0]
    sae_logits = run(spliced)
    kl = jnp.sum(_kl(clean_logits, sae_logits) * batch["weights"])
    moments = jax.tree.map(lambda *xs: sum(xs), *moments)
    return moments, nll(clean_logits), nll(sae_logits), nll(run(zeroed)), kl

  def eval_summary(self, totals):
    moments, (clean, count), (sae, _), (zero, _), kl = jax.tree.map(np.asarray, totals)
    count = max(float(count), 1.0)
    variance = moments["sum_sq"] - moments["sum"] ** 2 / moments["tokens"]
    fvu = float(moments["sse"] / np.sum(variance))
    ce_clean, ce_sae, ce_zero = clean / count, sae / count, zero / count
    return {"eval/fvu": fvu, "eval/explained_variance": 1.0 - fvu,
            "eval/l0": float(moments["active"] / moments["tokens"]),
            "eval/dead_fraction": float(np.mean(moments["fired_N"] == 0)),
            "eval/ce_clean": float(ce_clean), "eval/ce_sae": float(ce_sae),
            "eval/ce_zero_ablated": float(ce_zero),
            "eval/ce_recovered": float((ce_zero - ce_sae) / (ce_zero - ce_clean)),
            "eval/kl": float(kl / count), "eval/bpb_sae": float(ce_sae / math.log(2))}

  def _match_sites(self, window_T: np.ndarray) -> tuple[list[str], list[str]]:
    """The site paths `sae.sites` and `sae.target_sites` match, in model order."""
    sae = self.config.sae
    tokens = jnp.asarray(window_T)[None]
    inputs = sites_lib.match_sites(self.lm, tokens, sites=sae.sites)
    if not sae.target_sites:
      return inputs, []
    targets = sites_lib.match_sites(self.lm, tokens, sites=sae.target_sites)
    if len(targets) != len(inputs):
      raise ValueError(f"config.sae.sites={sae.sites!r} matches {inputs} but "
                       f"config.sae.target_sites={sae.target_sites!r} matches {targets}; a "
                       f"transcoder needs one target per input site")
    return inputs, targets

  def _site_pairs(self) -> list[tuple[str, str | None]]:
    return list(zip(self.input_sites, self.target_sites or [None] * len(self.input_sites)))

  def _all_sites(self) -> list[str]:
    return [*self.input_sites, *self.target_sites]

  def _harvest_or_load(self, windows) -> tuple[np.ndarray, np.ndarray | None]:
    """[tokens, D] inputs (and targets) at the sites, from the cache when it holds them."""
    cache_dir = self.config.sae.cache_dir
    if cache_dir is None:
      return self._harvest(windows)
    path = os.path.join(cache_dir, f"activations_{self._cache_key()}")
    if not os.path.exists(path + ".json"):
      os.makedirs(cache_dir, exist_ok=True)
      inputs, targets = self._harvest(windows)
      activations_lib.write_activations(path + ".inputs.array_record", [inputs])
      if targets is not None:
        activations_lib.write_activations(path + ".targets.array_record", [targets])
      with open(path + ".json.tmp", "w") as f:  # the marker appears only once all is written
        json.dump(self._cache_fields(), f, indent=1)
      os.replace(path + ".json.tmp", path + ".json")
      print(f"cached {len(inputs):,} activations in {path}.*", flush=True)
      return inputs, targets
    read = lambda kind: activations_lib.ActivationDataset(f"{path}.{kind}.array_record").array()
    print(f"read the activations cached in {path}.*", flush=True)
    return read("inputs"), (read("targets") if self.target_sites else None)

  def _cache_fields(self) -> dict:
    sae = self.config.sae
    steps = self.lm_config.train.num_steps
    checkpoint = os.path.join(sae.lm_workdir, "checkpoints", str(steps))
    return {"lm_workdir": os.path.abspath(sae.lm_workdir), "lm_steps": steps,
            "lm_checkpoint_mtime": os.path.getmtime(checkpoint),
            "sites": self.input_sites, "target_sites": self.target_sites,
            "harvest_tokens": sae.harvest_tokens, "seed": self.config.seed}

  def _cache_key(self) -> str:
    text = json.dumps(self._cache_fields(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def _harvest(self, windows) -> tuple[np.ndarray, np.ndarray | None]:
    """Activations at the sites on `sae.harvest_tokens` tokens of seeded training windows."""
    sae, seq_len = self.config.sae, self.lm_config.train.seq_len
    per_site = len(self._site_pairs())
    num_windows = min(len(windows), -(-sae.harvest_tokens // (seq_len * per_site)))
    order = np.random.default_rng(self.config.seed).permutation(len(windows))[:num_windows]
    collect = jax.jit(lambda tokens: sites_lib.collect(
        self.lm, self.lm_variables, tokens, sites=self._all_sites(), deterministic=True)[1])
    pairs = self._site_pairs()
    inputs, targets = [[] for _ in pairs], [[] for _ in pairs]
    for start in range(0, num_windows, HARVEST_WINDOWS):
      tokens = np.stack([windows[int(i)]["inputs"] for i in order[start:start + HARVEST_WINDOWS]])
      captured = jax.device_get(collect(tokens))
      for site, (source, target) in enumerate(pairs):
        inputs[site].append(np.asarray(_rows_of(captured[source]), np.float32))
        if target:
          targets[site].append(np.asarray(_rows_of(captured[target]), np.float32))
    per_site_rows = sae.harvest_tokens // per_site  # every site of a layer group alike
    join = lambda rows: np.concatenate([np.concatenate(r)[:per_site_rows] for r in rows])
    return join(inputs), (join(targets) if self.target_sites else None)


def load_lm(lm_workdir: str, lm_config_file: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables) of the finished LM run in `lm_workdir` (params and layer state such as
  router biases), training it there first when it is missing or unfinished (from its own
  config.json, else `lm_config_file`)."""
  saved = os.path.join(lm_workdir, run_config.CONFIG_FILE)
  if os.path.exists(saved):
    with open(saved) as f:
      lm_config = ml_collections.ConfigDict(json.load(f))
  else:
    lm_config = run_config.load_config(lm_config_file, [])
  if lm_config.task != "lm":
    raise ValueError(f"config.sae.lm_workdir={lm_workdir!r} holds a {lm_config.task!r} run, "
                     f"not an 'lm' one")
  if lm_config.sparsity.enabled:
    raise ValueError(f"config.sae.lm_workdir={lm_workdir!r} holds a sparse-trained LM; its "
                     f"checkpoint keeps the mask apart from the weights, which the sae task does "
                     f"not apply yet: use a dense LM")
  if _latest_step(lm_workdir) != lm_config.train.num_steps:
    if jax.process_count() > 1:
      raise ValueError(f"config.sae.lm_workdir={lm_workdir!r} holds no finished LM run; train "
                       f"it first (with several processes the SAE task does not)")
    print(f"training the LM of {saved if os.path.exists(saved) else lm_config_file} in "
          f"{lm_workdir} first", flush=True)
    from experiments import trainer  # pylint: disable=import-outside-toplevel
    lm_config.mesh.update(data=-1, fsdp=1, expert=1, model=1)  # every local device, data-parallel
    trainer.train(lm_config, lm_workdir)
  source = ckpt_lib.Checkpoints(lm_workdir, read_only=True)
  try:
    saved_state = source.restore_saved(source.latest_step())
  finally:
    source.close()
  return lm_config, {"params": saved_state["params"], **saved_state["model_state"]}


def _latest_step(workdir: str) -> int | None:
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  source = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    return source.latest_step()
  finally:
    source.close()


def _rows_of(x_BT_: jax.Array, width: int | None = None) -> jax.Array:
  """[B, T, ...] site values as [B * T, prod(...)] rows (of `width` when given)."""
  return x_BT_.reshape(x_BT_.shape[0] * x_BT_.shape[1], -1 if width is None else width)


def _moments(y_hat_TD, y_TD, acts_TN, weights_T) -> dict[str, jax.Array]:
  """Weighted sums that add up over batches into FVU, L0 and per-latent firing counts."""
  w_T1 = weights_T[:, None]
  fired_TN = (acts_TN != 0) * w_T1
  return {"sse": jnp.sum((y_hat_TD - y_TD) ** 2 * w_T1), "sum": jnp.sum(y_TD * w_T1, 0),
          "sum_sq": jnp.sum(y_TD**2 * w_T1, 0), "tokens": jnp.sum(weights_T),
          "active": jnp.sum(fired_TN), "fired_N": jnp.sum(fired_TN, 0)}


def _kl(p_logits, q_logits) -> jax.Array:
  """KL(softmax p || softmax q) per position."""
  log_p, log_q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
