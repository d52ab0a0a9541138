"""Every config field the trainer knows, with its default.

Other configs start from `get_config()` here and override fields; the trainer rejects keys
that are not in this schema (except inside `model.ffn` and `model.attention`, whose extra
keys are the chosen layer's own arguments and are checked by the model builder, and likewise
inside `classifier`, `sae.dictionary`, `sparsity.updater` and `sparsity.schedule`).
"""
import ml_collections
from ml_collections import config_dict

from sparsejax.masks import sam_on


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "lm": byte-level language model (config.model) on a TFDS text dataset; "classify": the
  # classifier config.classifier on a classification dataset (data.name="digits", bundled, or a
  # prepared TFDS image dataset such as "mnist", "fashion_mnist", "cifar10"; splits
  # data.train_split / data.eval_split); "sae": a sparse autoencoder on LM activations (c.sae).
  c.task = "lm"

  c.data = ml_collections.ConfigDict()
  c.data.name = "python_stdlib"  # the embedded corpus; or any TFDS text dataset, e.g. "lm1b"
  c.data.data_dir = config_dict.placeholder(str)  # None = TFDS default (~/tensorflow_datasets)
  c.data.text_key = "text"  # feature holding the text, for TFDS datasets other than python_stdlib
  c.data.train_split = "train"
  c.data.eval_split = "validation"

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 128
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.d_ff = 512
  c.model.max_len = 128
  c.model.positions = "rope"  # "rope" | "learned"
  c.model.tie_embeddings = True
  c.model.dtype = "float32"  # "float32" | "bfloat16"
  c.model.ffn = ml_collections.ConfigDict({"name": "dense"})
  c.model.ffn_layers = config_dict.placeholder(tuple)  # layers using model.ffn; None = all
  c.model.attention = ml_collections.ConfigDict({"name": "dense"})
  c.model.shared_router = False  # Omni-Router: one router weight for every MoE layer
  c.model.shared_memory_values = False  # one memory value table read by every "pkm" layer
  # Input embedding: {"name": "table"}, or e.g. {"name": "hashed", "num_rows": 4096, "max_n": 3,
  # "num_hashes": 2} (hashed byte n-grams; needs tie_embeddings=False).
  c.model.embedding = ml_collections.ConfigDict({"name": "table"})
  # The LM architecture (sparsejax.registry.LMS) and its own fields: "transformer" (num_layers
  # blocks), "universal" (one shared block applied up to num_layers times, with halting).
  c.model.architecture = ml_collections.ConfigDict({"name": "transformer"})

  # task="classify": a registered model (sparsejax.registry.MODELS) and its own arguments.
  c.classifier = ml_collections.ConfigDict({"name": "mlp"})

  # task="sae": a sparse autoencoder / transcoder on a trained LM's activations (see
  # experiments/tasks/sae.py). The LM run in lm_workdir (trained there first from lm_config when
  # missing); sites / target_sites: sparsejax.sites patterns; dictionary: SAEConfig's own fields.
  c.sae = ml_collections.ConfigDict()
  c.sae.lm_workdir = "/tmp/sparsejax_lm"  # the quickstart's workdir
  c.sae.lm_config = "experiments/configs/lm_dense.py"
  c.sae.sites = "layer_1/resid_post"
  c.sae.target_sites = config_dict.placeholder(str)  # set for a transcoder
  c.sae.harvest_tokens = 2**18
  c.sae.cache_dir = config_dict.placeholder(str)  # None: harvest in memory on every start
  c.sae.eval_windows = 16  # LM windows per eval batch
  c.sae.unit_norm_decoder = True
  c.sae.init = "tied"  # or "active_subspace"; b_dec starts at the data's geometric median
  c.sae.dictionary = ml_collections.ConfigDict({"kind": "topk", "num_latents": 2048, "k": 16})

  # task="forecast": next-patch forecasting of synthetic multi-frequency series
  # (data.name="synthetic_series", experiments/tasks/forecast.py) by a decoder-only Transformer
  # with c.model's settings; train.seq_len is the number of input patches.
  c.forecast = ml_collections.ConfigDict()
  c.forecast.patch_size = 8
  c.forecast.projection = "shared"  # "shared" (Moirai-MoE) | "per_frequency" (Moirai)
  c.forecast.train_series = 16384  # training windows; eval: train.eval_batches x batch_size
  c.forecast.data_seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 400
  c.train.batch_size = 32
  c.train.seq_len = 128
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 40
  c.train.end_lr_fraction = 0.1  # cosine decays to learning_rate * end_lr_fraction
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  # Product-key memory value tables' own peak learning rate (same schedule); None = learning_rate.
  c.train.memory_value_learning_rate = config_dict.placeholder(float)
  # Memory value tables: "dense" AdamW, or "sparse" lazy row-wise AdamW on the rows read
  # (sparsejax.memory.sparse_optim) with a static memory_value_rows rows per step and table
  # (batch_size x seq_len x heads x k, times the layers sharing a table).
  c.train.memory_values = "dense"
  c.train.memory_value_rows = config_dict.placeholder(int)
  # Sharpness-aware minimisation: the optimizer gets the gradient at w + eps, eps = rho g_S/|g_S|
  # on the params whose path matches sam_rule (default: normalisation layers, SAM-ON); 0 = off.
  # Costs a second gradient evaluation per step.
  c.train.sam_rho = 0.0
  c.train.sam_rule = sam_on.NORM_RULE
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.eval_batches = 16
  c.train.plot_expert_load = True  # PNG heatmap of per-layer expert load per eval (MoE models)

  # Start from another run's params instead of random init (only when DIR has no checkpoint).
  c.init = ml_collections.ConfigDict()
  c.init.from_workdir = config_dict.placeholder(str)  # a workdir holding checkpoints
  c.init.upcycle = False  # dense FFN params -> MoE experts (sparse upcycling)

  # Weight sparsity (sparsejax.masks): a mask per param, kept in the optimizer state, evolved by
  # an updater on a schedule. Dense leaves (biases, norms, rule "dense") are never masked.
  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.enabled = False
  c.sparsity.density = 0.1  # initial kept fraction over the sparsified leaves, in (0, 1]
  c.sparsity.distribution = "erk"  # over the leaves: "uniform" | "erk" | "global"
  c.sparsity.erk_power = 1.0
  # ((regex on the param path, structure), ...), first match wins; a structure is "dense",
  # "unstructured", "fan_in", "nm:n=2,m=4", "block:block=4x4", ...; unmatched: >=2-D
  # kernels "unstructured", 1-D leaves dense.
  c.sparsity.rules = ()
  # Initial mask scores: "random" | "magnitude" (|w|) | "saliency" (SNIP, |w g|) | "fisher"
  # (sum_b g_b^2); g from the training loss on the first `init_batches` training batches, at the
  # initial params (the loaded ones under init.from_workdir).
  c.sparsity.init = "random"
  c.sparsity.init_batches = 4
  # A registered updater (sparsejax.registry.UPDATERS) and its arguments, e.g.
  # {"name": "rigl", "exploration": 0.0}; and the schedule (SCHEDULES) driving it, e.g.
  # {"name": "cosine", "drop_fraction": 0.3, "end": 1500, "update_every": 50}; "none" = the
  # mask never changes.
  c.sparsity.updater = ml_collections.ConfigDict({"name": "static"})
  c.sparsity.schedule = ml_collections.ConfigDict({"name": "none"})
  # AC/DC's recipe (Peste et al. 2021) for any schedule: restart AdamW's moments and step count
  # after every mask update step, and / or restart the learning-rate schedule after every prune
  # step (an update step with sparsity > 0; learning-rate rewinding, Renda et al. 2020).
  c.sparsity.reset_optimizer = False
  c.sparsity.rewind_lr = False

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100
  c.checkpoint.keep = 3

  # Mesh axis sizes; one may be -1 = "all remaining devices".
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.model = 1
  return c
