"""SAEs in SAELens's on-disk layout, and folding an input scale into the weights.

  saelens_config / config_from_saelens
               our `SAEConfig` <-> a SAELens (>= 6) cfg dict: "architecture" ("standard",
               "topk", "jumprelu", "transcoder", "skip_transcoder", "jumprelu_transcoder"),
               "d_in", "d_sae", "k", "d_out", "apply_b_dec_to_input", "metadata", ...
  save_saelens / load_saelens
               a directory holding `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc
               [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae] for the jumprelu
               architectures, W_skip [d_out, d_in] for a skip transcoder) and `cfg.json`: what
               SAELens's `SAE.save_model` writes and `SAE.load_from_disk` reads.
  fold_input_scale
               an SAE trained on inputs scaled by s rewritten to take and return raw activations.

Our params hold "log_threshold" (threshold = exp(log_threshold)) where SAELens stores
"threshold", and W_skip as [d_in, d_out] where SAELens stores its transpose (x @ W_skip.T). A
BatchTopK dictionary is exported as JumpReLU (`core.batchtopk_to_jumprelu`), as SAELens does.
"""
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from sparsejax.sae.config import SAEConfig

SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SAE_CFG_FILENAME = "cfg.json"
# SAELens's loader reads the cfg layout from this version (>= 6.0 is the layout written here).
SAELENS_LAYOUT_VERSION = "6.0.0"
# Architecture -> (kind, transcoder, skip), and the params beyond W_enc, b_enc, W_dec, b_dec.
_ARCHITECTURES = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
}

def saelens_config(config: SAEConfig, *, dtype: str = "float32", **metadata: Any
                   ) -> dict[str, Any]:
  """The SAELens cfg dict of a dictionary with `config`; `metadata` (e.g. model_name,
  hook_name, hook_layer) goes under "metadata".

  relu -> "standard" (a transcoder: "transcoder", "skip_transcoder"), topk -> "topk",
  jumprelu -> "jumprelu" / "jumprelu_transcoder". An autoencoder subtracts b_dec from its input
  (apply_b_dec_to_input = True), a transcoder does not, as in `core.pre_activations`.
  """
  architecture = _architecture(config)
  cfg = {"architecture": architecture, "d_in": config.d_in, "d_sae": config.num_latents,
         "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": not config.transcoder,
         "normalize_activations": "none", "reshape_activations": "none",
         "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION, **metadata}}
  if architecture == "topk":
    cfg.update(k=config.k, rescale_acts_by_decoder_norm=False)
  if config.transcoder:
    cfg["d_out"] = config.d_out
  return cfg


def config_from_saelens(cfg: dict[str, Any], **overrides: Any) -> SAEConfig:
  """The `SAEConfig` computing what a SAELens SAE with cfg dict `cfg` computes; `overrides`
  set the training-only fields (penalty coefficients, ...)."""
  kind, transcoder, skip = _signature(cfg)
  for key, allowed in (("normalize_activations", "none"), ("reshape_activations", "none"),
                       ("rescale_acts_by_decoder_norm", False),
                       ("apply_b_dec_to_input", not transcoder)):
    if cfg.get(key, allowed) != allowed:
      raise ValueError(f"cfg[{key!r}]={cfg[key]!r}; a {cfg['architecture']!r} SAE here needs "
                       f"{allowed!r} (fold it into the weights first)")
  fields = {"d_in": cfg["d_in"], "num_latents": cfg["d_sae"], "kind": kind, "skip": skip,
            "d_out": cfg["d_out"] if transcoder else None}
  if kind == "topk":
    fields["k"] = cfg["k"]
  return SAEConfig(**{**fields, **overrides})


def save_saelens(directory: str, params: dict[str, Any], config_dict: dict[str, Any]) -> None:
  """Writes `params` and the SAELens cfg dict `config_dict` (`saelens_config`) to `directory`.

  The file holds each param under SAELens's name, "threshold" = exp(log_threshold) and
  W_skip^T, in the params' dtype (which must be `config_dict["dtype"]`, default "float32").
  Every param survives `load_saelens` bit-exactly except log_threshold, whose exp and log
  (in float64, rounded once) leave it exact where |log_threshold| >= 2 (e.g. thresholds below
  0.14) and within 2^-23 elsewhere.
  """
  shapes = _saelens_shapes(config_dict)
  ours = {_our_name(name) for name in shapes}
  if set(params) != ours:
    raise ValueError(f"params of a {config_dict['architecture']!r} SAE must be exactly "
                     f"{sorted(ours)}, got {sorted(params)}")
  dtype = config_dict.get("dtype", "float32")
  tensors = {name: _to_saelens(name, np.asarray(jax.device_get(params[_our_name(name)])))
             for name in shapes}
  for name, array in tensors.items():
    if array.shape != shapes[name] or array.dtype.name != dtype:
      raise ValueError(f"param {_our_name(name)!r} as SAELens's {name!r} must be "
                       f"{dtype} {shapes[name]} for this cfg, got {array.dtype.name} "
                       f"{array.shape}")
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(directory, SAE_WEIGHTS_FILENAME))
  with open(os.path.join(directory, SAE_CFG_FILENAME), "w") as f:
    json.dump(config_dict, f, indent=1)


def load_saelens(directory: str) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """(params, config_dict) from a SAELens directory (`save_saelens`, or SAELens's own
  `save_model` for the architectures of `saelens_config`): our param names and layouts,
  log_threshold = log(threshold)."""
  with open(os.path.join(directory, SAE_CFG_FILENAME)) as f:
    config_dict = json.load(f)
  shapes = _saelens_shapes(config_dict)
  tensors = safetensors.numpy.load_file(os.path.join(directory, SAE_WEIGHTS_FILENAME))
  if set(tensors) != set(shapes):
    raise ValueError(f"{directory}: a {config_dict['architecture']!r} SAE stores exactly "
                     f"{sorted(shapes)}, the file holds {sorted(tensors)}")
  for name, array in tensors.items():
    if array.shape != shapes[name]:
      raise ValueError(f"{directory}: tensor {name!r} has shape {array.shape}, the cfg needs "
                       f"{shapes[name]}")
  params = {_our_name(name): jnp.asarray(_from_saelens(name, array))
            for name, array in tensors.items()}
  return params, config_dict


def fold_input_scale(params: dict[str, jax.Array], scale: float, *,
                     target_scale: float | None = None) -> dict[str, jax.Array]:
  """Params that take raw x and return raw-scale outputs, from params trained on s x -> t y.

  With s = `scale` and t = `target_scale` (default s; an autoencoder's target is its input):
    z = (s x - b_dec) W_enc + b_enc = (x - b_dec / s) (s W_enc) + b_enc
    y_hat / t = a (W_dec / t) + b_dec / t + x (s W_skip / t)
  so W_enc' = s W_enc, W_dec' = W_dec / t, b_dec' = b_dec / t, W_skip' = (s / t) W_skip, while
  b_enc and log_threshold stay: the pre-activations z, hence every threshold and top-k choice,
  are unchanged. (A transcoder does not subtract b_dec; the same rewrite holds with that term
  left out, and its t may differ from s.) The decoder rows are no longer unit norm (|row| = 1/t).
  SAELens's fold_activation_norm_scaling_factor (normalize_activations "expected_average_only_in").
  """
  target_scale = scale if target_scale is None else target_scale
  for name, value in (("scale", scale), ("target_scale", target_scale)):
    if not value > 0:
      raise ValueError(f"{name} must be > 0, got {value}")
  folded = dict(params)
  folded["W_enc"] = params["W_enc"] * scale
  folded["W_dec"] = params["W_dec"] / target_scale
  folded["b_dec"] = params["b_dec"] / target_scale
  if "W_skip" in params:
    folded["W_skip"] = params["W_skip"] * (scale / target_scale)
  return folded


def _architecture(config: SAEConfig) -> str:
  """The SAELens architecture name of `config`, or a ValueError when SAELens has none."""
  for name, signature in _ARCHITECTURES.items():
    if signature == (config.kind, config.transcoder, config.skip):
      return name
  hint = (" (export it with core.batchtopk_to_jumprelu first)" if config.kind == "batchtopk"
          else "")
  raise ValueError(f"SAELens has no architecture for kind={config.kind!r} with "
                   f"transcoder={config.transcoder}, skip={config.skip}{hint}; it has "
                   f"{', '.join(_ARCHITECTURES)}")


def _signature(cfg: dict[str, Any]) -> tuple[str, bool, bool]:
  """(kind, transcoder, skip) of the SAELens architecture cfg["architecture"]."""
  architecture = cfg.get("architecture")
  if architecture not in _ARCHITECTURES:
    raise ValueError(f"cfg['architecture']={architecture!r}; allowed: "
                     f"{', '.join(_ARCHITECTURES)}")
  return _ARCHITECTURES[architecture]


def _saelens_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """The tensors of SAELens's state dict for `cfg`, name -> shape."""
  kind, transcoder, skip = _signature(cfg)
  d_in, d_sae = cfg["d_in"], cfg["d_sae"]
  d_out = cfg["d_out"] if transcoder else d_in
  shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out),
            "b_dec": (d_out,)}
  if kind == "jumprelu":
    shapes["threshold"] = (d_sae,)
  if skip:
    shapes["W_skip"] = (d_out, d_in)
  return shapes


def _our_name(saelens_name: str) -> str:
  return "log_threshold" if saelens_name == "threshold" else saelens_name


def _to_saelens(name: str, array: np.ndarray) -> np.ndarray:
  """Our param `name` in SAELens's layout (contiguous, as safetensors stores it)."""
  if name == "threshold":
    array = np.exp(array.astype(np.float64)).astype(array.dtype)
  elif name == "W_skip":
    array = array.T
  return np.ascontiguousarray(array)


def _from_saelens(name: str, array: np.ndarray) -> np.ndarray:
  """SAELens's tensor `name` in our layout (the inverse of `_to_saelens`)."""
  if name == "threshold":
    with np.errstate(divide="ignore"):  # a threshold of 0 is log_threshold = -inf
      return np.log(array.astype(np.float64)).astype(array.dtype)
  if name == "W_skip":
    return np.ascontiguousarray(array.T)
  return array
