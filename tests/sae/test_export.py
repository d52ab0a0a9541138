"""SAELens export: file layout, bit-exact round trip, SAELens forward pass, scale folding."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sparsejax.sae import core
from sparsejax.sae import export
from sparsejax.sae.config import SAEConfig

D_IN, N, D_OUT, T = 6, 10, 5, 7
CONFIGS = {
    "standard": SAEConfig(D_IN, N, kind="relu"),
    "topk": SAEConfig(D_IN, N, kind="topk", k=3),
    "jumprelu": SAEConfig(D_IN, N, kind="jumprelu"),
    "transcoder": SAEConfig(D_IN, N, kind="relu", d_out=D_OUT),
    "skip_transcoder": SAEConfig(D_IN, N, kind="relu", d_out=D_OUT, skip=True),
    "jumprelu_transcoder": SAEConfig(D_IN, N, kind="jumprelu", d_out=D_OUT),
}
# SAELens's state dict per architecture, written out by hand from its SAE classes.
SAELENS_SHAPES = {
    "standard": {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_IN), "b_dec": (D_IN,)},
    "topk": {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_IN), "b_dec": (D_IN,)},
    "jumprelu": {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_IN), "b_dec": (D_IN,),
                 "threshold": (N,)},
    "transcoder": {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_OUT), "b_dec": (D_OUT,)},
    "skip_transcoder": {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_OUT),
                        "b_dec": (D_OUT,), "W_skip": (D_OUT, D_IN)},
    "jumprelu_transcoder": {"W_enc": (D_IN, N), "b_enc": (N,), "W_dec": (N, D_OUT),
                            "b_dec": (D_OUT,), "threshold": (N,)},
}


def _random_params(config, seed=0):
  """Params of `config` with every entry random (thresholds around e^-4 = 0.018)."""
  d_out = config.d_out or config.d_in
  shapes = {"W_enc": (config.d_in, N), "b_enc": (N,), "W_dec": (N, d_out), "b_dec": (d_out,)}
  if config.kind == "jumprelu":
    shapes["log_threshold"] = (N,)
  if config.skip:
    shapes["W_skip"] = (config.d_in, d_out)
  rng = np.random.default_rng(seed)
  params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
  if "log_threshold" in params:
    params["log_threshold"] = rng.uniform(-7.0, -2.0, N).astype(np.float32)
  return {name: jnp.asarray(value) for name, value in params.items()}


def _saelens_forward(tensors, cfg, x):
  """SAELens's inference forward pass in NumPy, from its StandardSAE / TopKSAE / JumpReLUSAE /
  Transcoder / SkipTranscoder code: sae_in = x - b_dec * apply_b_dec_to_input,
  h = sae_in @ W_enc + b_enc, acts = relu(h) (jumprelu: relu(h) * (h > threshold); topk: relu
  of the k largest), out = acts @ W_dec + b_dec (+ x @ W_skip.T)."""
  sae_in = x - tensors["b_dec"] if cfg["apply_b_dec_to_input"] else x
  h = sae_in @ tensors["W_enc"] + tensors["b_enc"]
  acts = np.maximum(h, 0.0)
  if "threshold" in tensors:
    acts = acts * (h > tensors["threshold"])
  if cfg["architecture"] == "topk":
    kept = np.argsort(-h, axis=-1)[:, :cfg["k"]]
    acts = np.zeros_like(h)
    np.put_along_axis(acts, kept, np.maximum(np.take_along_axis(h, kept, -1), 0.0), -1)
  out = acts @ tensors["W_dec"] + tensors["b_dec"]
  if "W_skip" in tensors:
    out = out + x @ tensors["W_skip"].T
  return out


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_round_trip_is_bit_exact_and_the_file_has_saelens_names_and_shapes(tmp_path,
                                                                           architecture):
  config = CONFIGS[architecture]
  params = _random_params(config)
  cfg = export.saelens_config(config, model_name="tiny", hook_name="blocks.0.hook_resid_post")
  export.save_saelens(str(tmp_path), params, cfg)
  assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "sae_weights.safetensors"))
  assert {k: v.shape for k, v in tensors.items()} == SAELENS_SHAPES[architecture]
  assert all(v.dtype == np.float32 for v in tensors.values())
  if "threshold" in tensors:
    np.testing.assert_allclose(tensors["threshold"], np.exp(params["log_threshold"]), rtol=1e-6)
  if "W_skip" in tensors:
    np.testing.assert_array_equal(tensors["W_skip"], np.asarray(params["W_skip"]).T)
  with open(os.path.join(tmp_path, "cfg.json")) as f:
    assert json.load(f) == cfg
  loaded, loaded_cfg = export.load_saelens(str(tmp_path))
  assert loaded_cfg == cfg
  assert sorted(loaded) == sorted(params)
  for name, value in params.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]).view(np.uint32),
                                  np.asarray(value).view(np.uint32), err_msg=name)
  assert export.config_from_saelens(loaded_cfg) == config


def test_saelens_cfg_keys():
  cfg = export.saelens_config(CONFIGS["topk"], hook_name="blocks.1.hook_resid_post")
  assert cfg["architecture"] == "topk" and cfg["k"] == 3
  assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, N, "float32")
  assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
  assert cfg["rescale_acts_by_decoder_norm"] is False
  assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
  assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # SAELens 6 cfg layout
  transcoder = export.saelens_config(CONFIGS["skip_transcoder"])
  assert transcoder["d_out"] == D_OUT and transcoder["apply_b_dec_to_input"] is False


def test_log_threshold_near_zero_round_trips_within_float32_rounding(tmp_path):
  params = _random_params(CONFIGS["jumprelu"])
  params["log_threshold"] = jnp.linspace(-1.9, 1.9, N)
  export.save_saelens(str(tmp_path), params, export.saelens_config(CONFIGS["jumprelu"]))
  loaded, _ = export.load_saelens(str(tmp_path))
  np.testing.assert_allclose(loaded["log_threshold"], params["log_threshold"], rtol=0,
                             atol=2.0**-23)


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_saelens_forward_on_the_file_matches_our_core(tmp_path, architecture):
  config = CONFIGS[architecture]
  params = _random_params(config, seed=1)
  export.save_saelens(str(tmp_path), params, export.saelens_config(config))
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "sae_weights.safetensors"))
  with open(os.path.join(tmp_path, "cfg.json")) as f:
    cfg = json.load(f)
  x = np.random.default_rng(2).normal(size=(T, D_IN)).astype(np.float32)
  ours, _, _, _ = core.sae_apply(params, jnp.asarray(x), config)
  np.testing.assert_allclose(ours, _saelens_forward(tensors, cfg, x), rtol=1e-5, atol=1e-5)


def test_batchtopk_exports_as_jumprelu_with_the_same_forward_pass(tmp_path):
  config = SAEConfig(D_IN, N, kind="batchtopk", k=3)
  params = _random_params(config, seed=3)
  state = {**core.init_state(config), "batchtopk_threshold": jnp.float32(0.4)}
  with pytest.raises(ValueError, match="batchtopk_to_jumprelu"):
    export.saelens_config(config)
  jumprelu_params, jumprelu_config = core.batchtopk_to_jumprelu(params, state, config)
  export.save_saelens(str(tmp_path), jumprelu_params, export.saelens_config(jumprelu_config))
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "sae_weights.safetensors"))
  np.testing.assert_allclose(tensors["threshold"], np.full(N, 0.4), rtol=1e-6)
  x = np.random.default_rng(4).normal(size=(T, D_IN)).astype(np.float32)
  ours, _, _, _ = core.sae_apply(params, jnp.asarray(x), config, state=state)
  cfg = export.saelens_config(jumprelu_config)
  np.testing.assert_allclose(ours, _saelens_forward(tensors, cfg, x), rtol=1e-5, atol=1e-5)


def _reference_apply(params, x, kind, *, k=3, transcoder=False):
  """A small NumPy SAE: z = (x - b_dec) W_enc + b_enc (no b_dec for a transcoder), relu /
  jumprelu / top-k of z, x_hat = a W_dec + b_dec (+ x W_skip)."""
  p = {name: np.asarray(value, np.float64) for name, value in params.items()}
  z = (x if transcoder else x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
  if kind == "relu":
    a = np.maximum(z, 0)
  elif kind == "jumprelu":
    a = z * (z > np.exp(p["log_threshold"]))
  else:
    a = np.where(z >= np.sort(z, axis=-1)[:, -k:-k + 1], np.maximum(z, 0), 0)
  x_hat = a @ p["W_dec"] + p["b_dec"]
  return x_hat + x @ p["W_skip"] if "W_skip" in p else x_hat


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_fold_input_scale_matches_the_unfolded_sae_on_scaled_inputs(architecture):
  config = CONFIGS[architecture]
  params = _random_params(config, seed=5)
  x = np.random.default_rng(6).normal(size=(T, D_IN)) * 40.0  # raw activations, large norm
  scale = 0.03
  want = _reference_apply(params, x * scale, config.kind) / scale
  folded = export.fold_input_scale(params, scale)
  np.testing.assert_allclose(_reference_apply(folded, x, config.kind), want, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_array_equal(folded["b_enc"], params["b_enc"])


def test_fold_input_scale_of_a_skip_transcoder_with_its_own_target_scale():
  config = CONFIGS["skip_transcoder"]
  params = _random_params(config, seed=7)
  x = np.random.default_rng(8).normal(size=(T, D_IN)) * 20.0
  scale, target_scale = 0.05, 0.4
  want = _reference_apply(params, x * scale, "relu", transcoder=True) / target_scale
  folded = export.fold_input_scale(params, scale, target_scale=target_scale)
  np.testing.assert_allclose(_reference_apply(folded, x, "relu", transcoder=True), want,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="target_scale"):
    export.fold_input_scale(params, scale, target_scale=0.0)


def test_bad_inputs_raise_value_errors(tmp_path):
  params = _random_params(CONFIGS["standard"])
  cfg = export.saelens_config(CONFIGS["standard"])
  with pytest.raises(ValueError, match="exactly"):
    export.save_saelens(str(tmp_path), {**params, "log_threshold": jnp.zeros(N)}, cfg)
  with pytest.raises(ValueError, match="'W_dec'"):
    export.save_saelens(str(tmp_path), {**params, "W_dec": jnp.zeros((N + 1, D_IN))}, cfg)
  with pytest.raises(ValueError, match="float32"):
    export.save_saelens(str(tmp_path), {**params, "b_enc": jnp.zeros(N, jnp.bfloat16)}, cfg)
  with pytest.raises(ValueError, match="architecture"):
    export.save_saelens(str(tmp_path), params, {**cfg, "architecture": "gated"})
  with pytest.raises(ValueError, match="kind='threshold'"):
    export.saelens_config(SAEConfig(D_IN, N, kind="threshold"))
  with pytest.raises(ValueError, match="apply_b_dec_to_input"):
    export.config_from_saelens({**cfg, "apply_b_dec_to_input": False})
  with pytest.raises(ValueError, match="scale"):
    export.fold_input_scale(params, -1.0)
