"""Top-k and predicted FFNs against naive NumPy references, hand cases and DenseFFN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sparsejax
from sparsejax.activations import sparse_ffn
from sparsejax.models import DenseFFN, build_lm

D, F, T, K = 8, 32, 5, 6


def _params(seed=0, activation="gelu", rank=4):
  rng = np.random.default_rng(seed)
  params = {"wi": rng.normal(size=(D, F)) / np.sqrt(D), "wo": rng.normal(size=(F, D)) / np.sqrt(F),
            "predictor_a": rng.normal(size=(D, rank)), "predictor_b": rng.normal(size=(rank, F))}
  if activation == "swiglu":
    params["wi_gate"] = rng.normal(size=(D, F)) / np.sqrt(D)
  return {name: np.asarray(value, np.float32) for name, value in params.items()}


def _x(seed=1, tokens=T):
  return np.random.default_rng(seed).normal(size=(tokens, D)).astype(np.float32)


def _gelu(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _gelu_grad(z):
  u = np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)
  du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * z**2)
  return 0.5 * (1 + np.tanh(u)) + 0.5 * z * (1 - np.tanh(u) ** 2) * du


def _np_hidden(p, x, activation):
  x = x.astype(np.float64)
  pre = x @ p["wi"]
  if activation == "gelu":
    return _gelu(pre)
  gate = x @ p["wi_gate"]
  return gate / (1 + np.exp(-gate)) * pre


def _np_topk_mask(values, k):
  mask = np.zeros(values.shape)
  np.put_along_axis(mask, np.argsort(-np.abs(values), axis=1)[:, :k], 1.0, axis=1)
  return mask


def test_topk_units_are_numpy_argsort_of_magnitude():
  h = np.random.default_rng(2).normal(size=(T, F)).astype(np.float32)
  idx = np.asarray(sparse_ffn.topk_units(jnp.asarray(h), K))
  np.testing.assert_array_equal(idx, np.argsort(-np.abs(h), axis=1)[:, :K])
  assert idx.dtype == np.int32


def test_num_active_resolves_k_and_fraction_and_rejects_bad_values():
  assert sparse_ffn.num_active(4096, None, 0.1) == 410
  assert sparse_ffn.num_active(512, None, 0.1) == 51
  assert sparse_ffn.num_active(512, 7, 0.1) == 7  # k overrides active_fraction
  assert sparse_ffn.num_active(8, None, 0.01) == 1
  with pytest.raises(ValueError, match=r"k=0 must be an int in \[1, 8\]"):
    sparse_ffn.num_active(8, 0, 0.1)
  with pytest.raises(ValueError, match="active_fraction=1.5"):
    sparse_ffn.num_active(8, None, 1.5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_masked_and_gathered_topk_ffn_equal_numpy(activation):
  p, x = _params(activation=activation), _x()
  h = _np_hidden(p, x, activation)
  want = (h * _np_topk_mask(h, K)) @ p["wo"]
  masked = sparse_ffn.topk_ffn(p, jnp.asarray(x), K, activation)
  gathered = sparse_ffn.topk_ffn_gathered(p, jnp.asarray(x), K, activation)
  np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gathered, want, rtol=1e-5, atol=1e-5)


def test_masked_topk_ffn_gradients_equal_numpy():
  """d/d(x, W_in, W_out) of sum(y * c): the mask is a constant, so only kept units get grads."""
  p, x = _params(), _x()
  c = np.random.default_rng(3).normal(size=(T, D))
  pre = x.astype(np.float64) @ p["wi"]
  mask = _np_topk_mask(_gelu(pre), K)
  d_h = (c @ p["wo"].T) * mask
  d_pre = d_h * _gelu_grad(pre)
  want = {"x": d_pre @ p["wi"].T, "wi": x.T @ d_pre, "wo": (_gelu(pre) * mask).T @ c}
  loss = lambda wi, wo, x: jnp.sum(sparse_ffn.topk_ffn({"wi": wi, "wo": wo}, x, K) * c)
  got = jax.grad(loss, argnums=(0, 1, 2))(p["wi"], p["wo"], x)
  for name, value in zip(("wi", "wo", "x"), got):
    np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.all(np.asarray(got[1])[mask.sum(axis=0) == 0] == 0)  # W_out rows never kept


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gathered_ffn_in_both_layouts_equals_the_numpy_masked_ffn(activation):
  p, x = _params(activation=activation), _x()
  idx = np.stack([np.random.default_rng(t).permutation(F)[:K] for t in range(T)]).astype(np.int32)
  h = _np_hidden(p, x, activation)
  mask = np.zeros((T, F))
  np.put_along_axis(mask, idx, 1.0, axis=1)
  want = (h * mask) @ p["wo"]
  prepared = sparse_ffn.gathered_params(p)
  np.testing.assert_array_equal(prepared["wi_t"], p["wi"].T)
  assert "wi" not in prepared and set(prepared) >= {"wo", "predictor_a", "predictor_b"}
  for layout in (p, prepared):
    got = sparse_ffn.gathered_ffn(layout, jnp.asarray(x), jnp.asarray(idx), activation)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_predictor_loss_hand_case():
  scores = jnp.array([[0.0, 2.0, -1.0]])
  # Unit 1 is the target: -log(1 - s(0)) = log 2, -log s(2) = log(1 + e^-2),
  # -log(1 - s(-1)) = log(1 + e^-1).
  want = (np.log(2) + np.log1p(np.exp(-2)) + np.log1p(np.exp(-1))) / 3
  got = sparse_ffn.predictor_loss(scores, jnp.array([[1]]))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_recall_hand_case():
  idx = jnp.array([[0, 1, 2], [3, 4, 5]])
  true = jnp.array([[2, 1, 7], [6, 7, 8]])
  np.testing.assert_allclose(sparse_ffn.recall(idx, true, 9), (2 / 3 + 0) / 2)


def test_predicted_ffn_equals_numpy_and_its_gathered_path():
  p, x = _params(), _x()
  scores = x.astype(np.float64) @ p["predictor_a"] @ p["predictor_b"]
  pred_mask = _np_topk_mask(np.maximum(scores - scores.min(), 0), K)  # largest scores
  h = _np_hidden(p, x, "gelu")
  true_mask = _np_topk_mask(h, K)
  prob = 1 / (1 + np.exp(-scores))
  want_loss = -np.mean(true_mask * np.log(prob) + (1 - true_mask) * np.log(1 - prob))
  y, loss, rec = sparse_ffn.predicted_ffn(p, jnp.asarray(x), K)
  np.testing.assert_allclose(y, (h * pred_mask) @ p["wo"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
  np.testing.assert_allclose(rec, (pred_mask * true_mask).sum() / (T * K), rtol=1e-6)
  for layout in (p, sparse_ffn.gathered_params(p)):
    np.testing.assert_allclose(sparse_ffn.predicted_ffn_gathered(layout, jnp.asarray(x), K), y,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_topk_module_keeping_every_unit_is_densefn_with_its_params(path):
  x = jnp.asarray(_x().reshape(1, T, D))
  dense = DenseFFN(d_model=D, d_ff=F, activation="swiglu")
  variables = dense.init(jax.random.key(0), x)
  topk = sparse_ffn.TopKFFN(d_model=D, d_ff=F, k=F, activation="swiglu", path=path)
  assert jax.tree.map(jnp.shape, topk.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, variables)
  y, aux = topk.apply(variables, x)
  np.testing.assert_allclose(y, dense.apply(variables, x)[0], rtol=1e-5, atol=1e-6)
  assert aux == {"losses": {}, "metrics": {"active_fraction": 1.0}}


@pytest.mark.parametrize("path", ["masked", "gathered", "auto"])
def test_modules_equal_the_pure_functions(path):
  x = _x(tokens=4).reshape(2, 2, D)
  topk = sparse_ffn.TopKFFN(d_model=D, d_ff=F, active_fraction=K / F, path=path)
  predicted = sparse_ffn.PredictedFFN(d_model=D, d_ff=F, k=K, rank=4, path=path)
  for module, pure in ((topk, lambda p, x: sparse_ffn.topk_ffn(p, x, K)),
                       (predicted, lambda p, x: sparse_ffn.predicted_ffn(p, x, K)[0])):
    variables = module.init(jax.random.key(1), x)
    params = nn.meta.unbox(variables)["params"]
    y, aux = module.apply(variables, x)
    np.testing.assert_allclose(y.reshape(4, D), pure(params, x.reshape(4, D)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(aux["metrics"]["active_fraction"], K / F)
  # "auto" takes the gathered path at 4 <= 16 tokens when deterministic: no predictor loss there.
  assert set(aux["losses"]) == ({"predictor"} if path == "masked" else set())
  if path == "auto":  # training calls take the masked path, so the predictor still trains
    _, aux = predicted.apply(variables, x, deterministic=False)
    assert set(aux["losses"]) == {"predictor"}


def test_predictor_loss_reaches_only_the_predictor():
  x = jnp.asarray(_x().reshape(1, T, D))
  module = sparse_ffn.PredictedFFN(d_model=D, d_ff=F, k=K, rank=4, predictor_coeff=2.0,
                                   path="masked")
  params = nn.meta.unbox(module.init(jax.random.key(0), x))["params"]
  loss_fn = lambda p, x: module.apply({"params": p}, x)[1]["losses"]["predictor"]
  (loss, (d_params, d_x)) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, x)
  _, want, _ = sparse_ffn.predicted_ffn(params, x[0], K)
  np.testing.assert_allclose(loss, 2.0 * want, rtol=1e-6)
  assert not np.any(d_x) and not np.any(d_params["wi"]) and not np.any(d_params["wo"])
  assert np.any(d_params["predictor_a"]) and np.any(d_params["predictor_b"])


def test_bad_fields_are_one_line_errors():
  x = jnp.zeros((1, 2, D))
  for kwargs, message in (({"path": "sparse"}, "path='sparse'; allowed: auto, masked"),
                          ({"activation": "relu"}, "activation='relu'; allowed: gelu, swiglu"),
                          ({"rank": 0}, "rank=0 must be a positive int")):
    with pytest.raises(ValueError, match=message):
      sparse_ffn.PredictedFFN(d_model=D, d_ff=F, **kwargs).init(jax.random.key(0), x)


@pytest.mark.parametrize("ffn", [{"name": "topk", "active_fraction": 0.25},
                                 {"name": "predicted", "k": 4, "rank": 4}])
def test_lm_builds_and_trains_one_step(ffn):
  config = ml_collections.ConfigDict({"d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32,
                                      "max_len": 8, "ffn": ffn})
  model = build_lm(config, vocab_size=11)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(4, 8)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens))["params"]

  def loss_fn(p):
    logits, aux = model.apply({"params": p}, tokens[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return nll + sparsejax.total_aux_loss(aux), aux

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, aux), grads = step(params)
  (new_loss, _), _ = step(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
  assert np.isfinite(loss) and float(new_loss) < float(loss)
  assert "layer_0/ffn/active_fraction" in aux["metrics"]
  if ffn["name"] == "predicted":
    assert "layer_0/ffn/predictor" in aux["losses"] and "layer_0/ffn/recall" in aux["metrics"]


@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_hidden_site_is_btf_like_densefn_and_holds_the_kept_units(path):
  """The "hidden" site is [B, T, F] (DenseFFN's layout, which neuron stats, probes and
  patching read by position), holding h at the kept units and 0 elsewhere."""
  x = _x(tokens=6).reshape(2, 3, D)
  topk = sparse_ffn.TopKFFN(d_model=D, d_ff=F, k=K, path=path)
  predicted = sparse_ffn.PredictedFFN(d_model=D, d_ff=F, k=K, rank=4, path=path)
  for module in (topk, predicted):
    variables = module.init(jax.random.key(1), x)
    p = jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])
    _, captured = sparsejax.sites.collect(module, variables, x, sites="hidden")
    h = _np_hidden(p, x.reshape(6, D), "gelu")
    ranked = h if module is topk else x.reshape(6, D) @ p["predictor_a"] @ p["predictor_b"]
    mask = _np_topk_mask(ranked - (0 if module is topk else ranked.min() - 1), K)
    assert captured["hidden"].shape == (2, 3, F)
    np.testing.assert_allclose(captured["hidden"], (h * mask).reshape(2, 3, F), rtol=1e-5,
                               atol=1e-6)
