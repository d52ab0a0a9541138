"""R-Sparse and N:M activation FFNs against hand cases and NumPy masked references."""
import functools

import hypothesis
import hypothesis.strategies as st
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sparsejax.activations import structured_ffn as sf
from sparsejax.models import DenseFFN, build_lm

D, F, T = 8, 16, 3


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _top_abs_mask(x_TD, k):
  """NumPy: True at each row's k largest |x| (stable argsort: ties to the lower index)."""
  idx = np.argsort(-np.abs(x_TD), axis=-1, kind="stable")[:, :k]
  mask = np.zeros(x_TD.shape, bool)
  np.put_along_axis(mask, idx, True, axis=-1)
  return mask


def _np_rsparse(x_TD, w_DF, rank, k):
  """NumPy R-Sparse: x_s W + (x - x_s) (rank-r SVD of W)."""
  u, s, vt = np.linalg.svd(w_DF.astype(np.float64), full_matrices=False)
  w_r = (u[:, :rank] * s[:rank]) @ vt[:rank]
  x_s = np.where(_top_abs_mask(x_TD, k), x_TD, 0)
  return x_s @ w_DF + (x_TD - x_s) @ w_r


# --- R-Sparse ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rsparse(x, w, rank, k):
  """rsparse_linear with the rank-r factors of w, and a b, in one compiled program."""
  a, b = sf.lowrank_factors(w, rank)
  return sf.rsparse_linear(x, w, (a, b), k), a @ b


def test_rsparse_linear_and_lowrank_factors_hand_case():
  w = jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
  x = jnp.array([[1.0, 3.0, 5.0], [1.0, 3.0, -0.5]])
  # Rank 1 of w: [[2, 0], [0, 0], [0, 0]]. Row 0, k = 1: channel 2 (|5|) is exact and reads a
  # zero row, channels 0, 1 go through the rank-1 part: y = [1 * 2, 0] (dense: [2, 3]).
  # Row 1, k = 1: channel 1 (|3|) exact: [0, 3]; channels 0, 2 rank-1: [2, 0].
  y, w_r = _rsparse(x, w, 1, 1)
  np.testing.assert_allclose(w_r, [[2, 0], [0, 0], [0, 0]], atol=1e-6)
  np.testing.assert_allclose(y, [[2, 0], [2, 3]], atol=1e-6)


def test_rsparse_linear_equals_dense_with_all_channels_or_full_rank():
  x, w = _rand(1, T, D), _rand(2, D, F)
  dense = x.astype(np.float64) @ w
  y_all, _ = _rsparse(x, w, 2, D)
  np.testing.assert_allclose(y_all, dense, rtol=1e-5, atol=1e-5)
  y_full, w_full = _rsparse(x, w, D, 3)
  np.testing.assert_allclose(w_full, w, atol=1e-5)
  np.testing.assert_allclose(y_full, dense, rtol=1e-4, atol=1e-4)


def test_rsparse_linear_matches_numpy_and_masked_gradients():
  x, w = _rand(3, T, D), _rand(4, D, F)
  np.testing.assert_allclose(_rsparse(x, w, 3, 4)[0], _np_rsparse(x, w, 3, 4), rtol=1e-4,
                             atol=1e-4)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  factors = a, b = u[:, :3] * s[:3], vt[:3]
  mask = jnp.asarray(_top_abs_mask(x, 4))

  def masked(x, w):  # the selection held fixed, as rsparse_linear treats it
    x_s = jnp.where(mask, x, 0)
    return x_s @ w + (x - x_s) @ a @ b

  g = _rand(5, T, F)
  loss = lambda fn: lambda x, w: jnp.sum(fn(x, w) * g)
  grads = jax.jit(jax.grad(loss(lambda x, w: sf.rsparse_linear(x, w, factors, 4)), (0, 1)))(x, w)
  expected = jax.jit(jax.grad(loss(masked), (0, 1)))(x, w)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rsparse_ffn_runs_dense_without_factors_and_sparse_with_them():
  x_BTD = jnp.asarray(_rand(6, 1, T, D))
  ffn = sf.RSparseFFN(d_model=D, d_ff=F, activation="swiglu", in_keep=0.5, hidden_keep=0.25)
  dense = DenseFFN(d_model=D, d_ff=F, activation="swiglu")

  @jax.jit
  def run(key):
    params = ffn.init(key, x_BTD)["params"]
    lowrank = sf.prepare_inference({"ffn": params}, rank=2)["ffn"]
    return (params, ffn.apply({"params": params}, x_BTD), dense.apply({"params": params}, x_BTD),
            ffn.apply({"params": params, "lowrank": lowrank}, x_BTD))

  params, (y_dense, aux_dense), (y_ref, _), (y_sparse, aux) = run(jax.random.key(0))
  np.testing.assert_allclose(y_dense, y_ref, rtol=1e-6)
  assert float(aux_dense["metrics"]["active_fraction"]) == 1.0
  p = jax.tree.map(np.asarray, nn.meta.unbox(params))
  x = np.asarray(x_BTD[0])
  gate, up = _np_rsparse(x, p["wi_gate"], 2, 4), _np_rsparse(x, p["wi"], 2, 4)
  h = gate / (1 + np.exp(-gate)) * up
  np.testing.assert_allclose(y_sparse[0], _np_rsparse(h, p["wo"], 2, 4), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(aux["metrics"]["active_fraction"], (4 + 4 + 4) / (8 + 8 + 16))
  kept = np.sort(x**2, axis=-1)[:, -4:].sum(-1) / (x**2).sum(-1)
  np.testing.assert_allclose(aux["metrics"]["kept_mass"], kept.mean(), rtol=1e-5)


def test_rsparse_errors():
  w = jnp.ones((D, F))
  with pytest.raises(ValueError, match="rank=9; allowed: an int in"):
    sf.lowrank_factors(w, 9)
  with pytest.raises(ValueError, match="k=0; allowed"):
    sf.rsparse_linear(jnp.ones((1, D)), w, (jnp.ones((D, 1)), jnp.ones((1, F))), 0)
  with pytest.raises(ValueError, match="w_lowrank_factors shapes"):
    sf.rsparse_linear(jnp.ones((1, D)), w, (jnp.ones((D, 2)), jnp.ones((3, F))), 1)
  ffn = sf.RSparseFFN(d_model=D, d_ff=F, in_keep=1.5)
  with pytest.raises(ValueError, match="in_keep=1.5; allowed: a fraction"):
    ffn.init(jax.random.key(0), jnp.ones((1, 1, D)))


# --- N:M activations ---------------------------------------------------------------------------


def _np_nm_mask(h_TF, n, m):
  groups = np.abs(h_TF).reshape(*h_TF.shape[:-1], -1, m)
  idx = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
  mask = np.zeros(groups.shape, bool)
  np.put_along_axis(mask, idx, True, axis=-1)
  return mask.reshape(h_TF.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _jit_mask(h, n, m):
  return sf.nm_activation_mask(h, n, m)


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (1, 1)])
def test_nm_activation_mask_matches_numpy_argsort(n, m):
  h = _rand(7, T, F)
  h[0, :4] = [0.5, -0.5, 0.5, 0.1]  # ties: the lower index wins
  np.testing.assert_array_equal(_jit_mask(jnp.asarray(h), n, m), _np_nm_mask(h, n, m))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (8, 16)]),
    values=st.lists(st.integers(-3, 3), min_size=2 * 16, max_size=2 * 16))
def test_nm_activation_mask_keeps_exactly_n_per_group(nm, values):
  n, m = nm
  h = np.asarray(values, np.float32).reshape(2, 16)
  mask = np.asarray(_jit_mask(jnp.asarray(h), n, m))
  groups_mask, groups_h = mask.reshape(2, -1, m), np.abs(h).reshape(2, -1, m)
  assert (groups_mask.sum(-1) == n).all()
  kept_min = np.where(groups_mask, groups_h, np.inf).min(-1)
  dropped_max = np.where(groups_mask, -np.inf, groups_h).max(-1)
  assert (kept_min >= dropped_max).all()


def test_nm_pack_and_linear_match_the_masked_matmul_and_its_gradient():
  h, w, g = _rand(8, T, F), _rand(9, F, D), _rand(10, T, D)
  mask = _np_nm_mask(h, 2, 4)
  vals, idx = jax.jit(sf.nm_pack, static_argnums=(1, 2))(jnp.asarray(h), 2, 4)
  assert vals.shape == idx.shape == (T, F // 2)
  np.testing.assert_array_equal(np.sort(idx, -1), np.nonzero(mask)[1].reshape(T, -1))
  np.testing.assert_allclose(vals, np.take_along_axis(h, np.asarray(idx), -1))
  loss = lambda h, w: jnp.sum(sf.nm_linear(h, w, 2, 4) * g)
  y, (d_h, d_w) = jax.jit(lambda h, w: (sf.nm_linear(h, w, 2, 4), jax.grad(loss, (0, 1))(h, w)))(
      h, w)
  np.testing.assert_allclose(y, np.where(mask, h, 0) @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_h, np.where(mask, g @ w.T, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_w, np.where(mask, h, 0).T @ g, rtol=1e-5, atol=1e-5)


def test_nm_act_ffn_gathered_equals_masked_and_numpy():
  x_BTD = jnp.asarray(_rand(11, 1, T, D))
  masked = sf.NMActivationFFN(d_model=D, d_ff=F, n=2, m=4)
  gathered = sf.NMActivationFFN(d_model=D, d_ff=F, n=2, m=4, implementation="gathered")

  @jax.jit
  def run(key):
    params = masked.init(key, x_BTD)["params"]
    return params, masked.apply({"params": params}, x_BTD), gathered.apply({"params": params},
                                                                           x_BTD)[0]

  params, (y, aux), y_gathered = run(jax.random.key(1))
  p = jax.tree.map(np.asarray, nn.meta.unbox(params))
  h = np.maximum(np.asarray(x_BTD[0]) @ p["wi"], 0) ** 2
  mask = _np_nm_mask(h, 2, 4)
  np.testing.assert_allclose(y[0], np.where(mask, h, 0) @ p["wo"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["metrics"]["kept_mass"], (h[mask] ** 2).sum() / (h**2).sum(),
                             rtol=1e-5)
  assert float(aux["metrics"]["active_fraction"]) == 0.5
  np.testing.assert_allclose(y_gathered, y, rtol=1e-5, atol=1e-6)


def test_nm_errors():
  with pytest.raises(ValueError, match="n=5; allowed: an int in \\[1, 4\\]"):
    sf.nm_activation_mask(jnp.ones((1, 8)), 5, 4)
  with pytest.raises(ValueError, match="hidden width 6 is not a multiple of m=4"):
    sf.nm_activation_mask(jnp.ones((1, 6)), 2, 4)
  ffn = sf.NMActivationFFN(d_model=D, d_ff=F, implementation="sparse")
  with pytest.raises(ValueError, match="implementation='sparse'; allowed: masked, gathered"):
    ffn.init(jax.random.key(0), jnp.ones((1, 1, D)))


# --- in the LM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn,attention", [
    (dict(name="rsparse", in_keep=0.5, hidden_keep=0.5), dict(name="dense")),
    (dict(name="nm_act", n=2, m=4, implementation="gathered"),
     dict(name="head_routed", head_fraction=0.5))])
def test_lm_builds_and_runs_with_the_layers(ffn, attention):
  config = ml_collections.ConfigDict(dict(d_model=D, num_layers=1, num_heads=2, d_ff=F,
                                          max_len=4, ffn=ffn, attention=attention))
  model = build_lm(config, vocab_size=11)
  tokens = jnp.array([[1, 2, 3, 4]])

  @jax.jit
  def init_and_apply(key):
    variables = model.init(key, tokens)
    if ffn["name"] == "rsparse":
      variables = {**variables, "lowrank": sf.prepare_inference(variables["params"], rank=2)}
    return model.apply(variables, tokens)

  logits, aux = init_and_apply(jax.random.key(0))
  assert logits.shape == (1, 4, 11) and np.isfinite(logits).all()
  assert float(aux["metrics"]["layer_0/ffn/active_fraction"]) < 1
  if attention["name"] == "head_routed":  # the LM test of test_head_routing.py's layer
    assert float(aux["metrics"]["layer_0/attention/active_fraction"]) == 0.5
    assert "layer_0/attention/router" in aux["losses"]


def test_hidden_site_is_btf_like_densefn():
  """The "hidden" site is [B, T, F] (DenseFFN's layout, which neuron stats, probes and
  patching read by position), in both layers."""
  from sparsejax import sites
  x_BTD = jnp.asarray(_rand(12, 2, T, D))
  for module in (sf.RSparseFFN(d_model=D, d_ff=F), sf.NMActivationFFN(d_model=D, d_ff=F)):
    variables = module.init(jax.random.key(0), x_BTD)
    p = jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])
    _, captured = sites.collect(module, variables, x_BTD, sites="hidden")
    pre = np.asarray(x_BTD) @ p["wi"]
    want = (0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
            if module.activation == "gelu" else np.maximum(pre, 0) ** 2)
    assert captured["hidden"].shape == (2, T, F)
    np.testing.assert_allclose(captured["hidden"], want, rtol=1e-5, atol=1e-6)
