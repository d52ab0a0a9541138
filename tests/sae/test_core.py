"""The pure SAE path against NumPy references on tiny cases: every kind, sparse decodes, AuxK,
BatchTopK and its JumpReLU export, the JumpReLU straight-through gradient, Matryoshka, OrtSAE,
initialisation, quasi-orthogonal k and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sae import core
from sparsejax.sae import initializers
from sparsejax.sae import penalties
from sparsejax.sae.config import SAEConfig

T, D, N, K = 6, 4, 8, 2
# One compiled program per test case (op-by-op dispatch compiles every primitive separately).
apply = jax.jit(core.sae_apply, static_argnames=("config", "training"))


def _params(config, seed=0):
  """Random float32 params of `config`'s shapes (NumPy draws: no compilation), with nonzero
  biases and decoder rows of unequal norms, so that every path shows."""
  rng = np.random.default_rng(seed)
  params = {name: rng.normal(size=shape) for name, shape in
            initializers.param_shapes(config).items()}
  params["W_enc"] /= np.sqrt(config.d_in)
  params["W_dec"] /= np.sqrt(config.out_dim)
  params["b_dec"] *= 0.3
  params["b_enc"] *= 0.1
  if "log_threshold" in params:
    params["log_threshold"] = np.full(config.num_latents, np.log(config.init_threshold))
  if "W_skip" in params:
    params["W_skip"] *= 0.2
  return {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}


def _x(seed=1, shape=(T, D)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _np(params):
  return {name: np.asarray(value, np.float64) for name, value in params.items()}


def _np_pre(p, x, transcoder=False):
  x = np.asarray(x, np.float64)
  return (x if transcoder else x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]


def _np_topk(pre, k):
  """Each row's k largest entries, through a ReLU; 0 elsewhere."""
  acts = np.zeros_like(pre)
  for t, row in enumerate(pre):
    top = np.argsort(-row)[:k]
    acts[t, top] = np.maximum(row[top], 0)
  return acts


def _np_fvu(x_hat, y):
  return np.sum((x_hat - y) ** 2) / np.sum((y - y.mean(0)) ** 2)


def _close(got, want, tol=1e-5):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["relu", "threshold", "jumprelu", "topk"])
def test_each_kind_matches_a_numpy_reference(kind):
  config = SAEConfig(d_in=D, num_latents=N, kind=kind, k=K, l1_coeff=0.3, threshold=0.2,
                     l0_coeff=0.1 if kind == "jumprelu" else 0.0, init_threshold=0.15)
  params = _params(config)
  x = _x()
  p = _np(params)
  pre = _np_pre(p, x)
  if kind == "relu":
    acts = np.maximum(pre, 0)
  elif kind == "threshold":
    acts = pre * (pre > 0.2)
  elif kind == "jumprelu":
    acts = pre * (pre > np.exp(p["log_threshold"]))
  else:
    acts = _np_topk(pre, K)
  x_hat, acts_TN, aux, _ = apply(params, x, config)
  _close(acts_TN, acts)
  _close(x_hat, acts @ p["W_dec"] + p["b_dec"])
  l1 = 0.3 * np.mean(np.abs(acts) @ np.linalg.norm(p["W_dec"], axis=1))
  _close(aux["losses"]["l1"], l1)
  _close(aux["metrics"]["l0"], np.mean(np.sum(acts != 0, axis=1)))
  if kind == "jumprelu":
    _close(aux["losses"]["l0"], 0.1 * np.mean(np.sum(pre > np.exp(p["log_threshold"]), axis=1)))


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_approx_selection_matches_numpy_on_cpu(kind):
  """`jax.lax.approx_max_k` is exact off TPU, so approx=True keeps the exact top-k here."""
  config = SAEConfig(d_in=D, num_latents=N, kind=kind, k=K, approx=True)
  params, x = _params(config), _x()
  pre = _np_pre(_np(params), x)
  if kind == "topk":
    want = _np_topk(pre, K)
  else:
    want = np.where(pre >= np.sort(pre.ravel())[-K * T], np.maximum(pre, 0), 0.0)
  _, acts_TN, _, _ = apply(params, x, config, state=core.init_state(config), training=True)
  _close(acts_TN, want)


def test_skip_transcoder_matches_numpy_and_does_not_centre_its_input():
  d_out = 3
  config = SAEConfig(d_in=D, num_latents=N, kind="topk", k=K, d_out=d_out, skip=True)
  params = _params(config)
  x, y = _x(), _x(seed=2, shape=(T, d_out))
  p = _np(params)
  acts = _np_topk(_np_pre(p, x, transcoder=True), K)
  want = acts @ p["W_dec"] + p["b_dec"] + np.asarray(x) @ p["W_skip"]
  x_hat, _, _, _ = apply(params, x, config, target_TD=y)
  _close(x_hat, want)
  _close(core.decode(params, jnp.asarray(acts, jnp.float32), config, x_TD=x), want)


def test_topk_sparse_decode_equals_the_dense_masked_decode_with_gradients():
  config = SAEConfig(d_in=D, num_latents=N, kind="topk", k=K)
  params, x = _params(config), _x()

  def dense_reference(params):
    """relu(pre) masked to each row's top-k by a dense [T, N] mask, times the full W_dec."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    kth_largest_T1 = jnp.sort(pre, axis=-1)[:, -K][:, None]
    acts = jnp.where(pre >= kth_largest_T1, jax.nn.relu(pre), 0.0)
    return acts @ params["W_dec"] + params["b_dec"]

  sparse = lambda params: apply(params, x, config)[0]
  _close(sparse(params), dense_reference(params))
  loss = lambda fn: lambda params: jnp.sum(jnp.sin(fn(params)))
  got = jax.jit(jax.grad(loss(sparse)))(params)
  want = jax.jit(jax.grad(loss(dense_reference)))(params)
  for name in want:
    _close(got[name], np.asarray(want[name]), tol=1e-4)


def test_batchtopk_keeps_exactly_k_times_t_largest_of_the_batch():
  config = SAEConfig(d_in=D, num_latents=N, kind="batchtopk", k=K)
  params = _params(config)
  params["b_enc"] = params["b_enc"] + 2.0  # every pre-activation positive: ties with 0 impossible
  x = _x()
  pre = _np_pre(_np(params), x)
  kept = np.sort(pre.ravel())[-K * T:]
  acts = np.where(pre >= kept[0], pre, 0.0)
  _, acts_TN, _, state = apply(params, x, config, state=core.init_state(config),
                                        training=True)
  assert int(np.sum(np.asarray(acts_TN) != 0)) == K * T
  _close(acts_TN, acts)
  # The first batch sets the threshold to the smallest kept activation; later ones blend it.
  _close(state["batchtopk_threshold"], kept[0])
  x2 = _x(seed=5)
  kept2 = np.sort(_np_pre(_np(params), x2).ravel())[-K * T:]
  _, _, _, state2 = apply(params, x2, config, state=state, training=True)
  _close(state2["batchtopk_threshold"], 0.99 * kept[0] + 0.01 * kept2[0])


def test_batchtopk_inference_is_a_single_threshold_and_its_jumprelu_export_is_identical():
  config = SAEConfig(d_in=D, num_latents=N, kind="batchtopk", k=K)
  params, x = _params(config), _x(shape=(32, D))
  state = dict(core.init_state(config), batchtopk_threshold=jnp.float32(0.4),
               tokens=jnp.float32(100))
  pre = _np_pre(_np(params), x)
  x_hat, acts_TN, _, _ = apply(params, x, config, state=state)
  _close(acts_TN, pre * (pre > 0.4))
  jr_params, jr_config = core.batchtopk_to_jumprelu(params, state, config)
  assert jr_config.kind == "jumprelu" and jr_config.l0_coeff == 0
  jr_x_hat, jr_acts, _, _ = apply(jr_params, x, jr_config)
  np.testing.assert_array_equal(jr_acts, acts_TN)
  np.testing.assert_array_equal(jr_x_hat, x_hat)


def test_auxk_reconstructs_the_residual_from_dead_latents_only():
  dead = [2, 4, 7]
  config = SAEConfig(d_in=D, num_latents=N, kind="topk", k=K, auxk=2, auxk_coeff=0.5,
                     dead_after_tokens=10)
  since_fired = np.zeros(N, np.float32)
  since_fired[dead] = [20, 10, 30]
  since_fired[5] = 9  # one token short of dead
  state = dict(core.init_state(config), tokens_since_fired=jnp.asarray(since_fired))
  params, x = _params(config), _x()
  p = _np(params)
  pre = _np_pre(p, x)
  residual = np.asarray(x, np.float64) - (_np_topk(pre, K) @ p["W_dec"] + p["b_dec"])
  dead_pre = np.full_like(pre, -np.inf)
  dead_pre[:, dead] = pre[:, dead]
  dead_acts = _np_topk(dead_pre, 2)
  dead_recon = dead_acts @ p["W_dec"]
  auxk = lambda params: apply(params, x, config, state=state)[2]["losses"]["auxk"]
  _close(auxk(params), 0.5 * _np_fvu(dead_recon, residual))
  grads = jax.jit(jax.grad(auxk))(params)
  row_norms = np.linalg.norm(np.asarray(grads["W_dec"]), axis=1)
  col_norms = np.linalg.norm(np.asarray(grads["W_enc"]), axis=0)
  used = np.any(dead_acts > 0, axis=0)  # dead latents in some token's top auxk
  assert set(np.flatnonzero(used)) <= set(dead) and used.sum() >= 2
  np.testing.assert_array_equal(row_norms > 0, used)
  np.testing.assert_array_equal(col_norms > 0, used)
  no_dead_state = core.init_state(config)
  assert float(apply(params, x, config, state=no_dead_state)[2]["losses"]["auxk"]) == 0


def test_jumprelu_threshold_gradient_equals_finite_differences_of_the_smoothed_loss():
  """The straight-through threshold gradient is the exact gradient of the loss with every step
  H(z - theta) replaced by the rectangle-smoothed step S(u) = clip(u / eps + 1/2, 0, 1), when

  * the loss is linear in the activations of the latents whose pre-activation lies inside the
    kernel window |z - theta| < eps / 2: the estimator takes dL/da at the actual (jumped or not)
    activation, the smoothed loss at the partly activated one; here the loss is a linear
    readout c . x_hat plus the L0 penalty;
  * those pre-activations sit exactly at the threshold, z = theta: the estimator's jump size is
    theta where the smoothed JumpReLU z S(z - theta) has z.

  Every other pre-activation is further than eps / 2 + (the finite-difference step) from its
  threshold, so S equals H there and moving theta by the step changes nothing.
  """
  eps, l0_coeff = 0.2, 0.3
  config = SAEConfig(d_in=N, num_latents=N, kind="jumprelu", l0_coeff=l0_coeff, bandwidth=eps)
  log_threshold = jnp.log(jnp.array([1.0, 0.8, 1.3, 0.6, 1.1, 0.9, 1.2, 0.7], jnp.float32))
  theta = np.asarray(jnp.exp(log_threshold))
  x = np.asarray(_x(seed=3, shape=(T, N)))
  x = np.where(np.abs(x - theta) < 0.5, theta + 0.6, x)  # far from the window...
  x[0, [0, 3]], x[2, 5], x[4, [3, 6]] = theta[[0, 3]], theta[5], theta[[3, 6]]  # ...or at theta
  x = jnp.asarray(x, jnp.float32)
  w_dec = jax.random.normal(jax.random.PRNGKey(4), (N, N))
  params = {"W_enc": jnp.eye(N), "b_enc": jnp.zeros(N), "W_dec": w_dec, "b_dec": jnp.zeros(N),
            "log_threshold": log_threshold}
  readout = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (N,)))

  def ste_loss(log_threshold):
    x_hat, _, aux, _ = apply(dict(params, log_threshold=log_threshold), x, config)
    return jnp.sum(x_hat @ readout) + aux["losses"]["l0"]

  def smoothed_loss(log_threshold):
    z, theta = np.asarray(x, np.float64), np.exp(log_threshold)
    step = np.clip((z - theta) / eps + 0.5, 0, 1)
    x_hat = (z * step) @ np.asarray(w_dec, np.float64)
    return np.sum(x_hat @ readout) + l0_coeff * np.mean(np.sum(step, axis=1))

  h = 1e-3
  lt = np.asarray(log_threshold, np.float64)
  finite_differences = [(smoothed_loss(lt + h * e) - smoothed_loss(lt - h * e)) / (2 * h)
                        for e in np.eye(N)]
  ste = jax.jit(jax.grad(ste_loss))(log_threshold)
  _close(ste, np.array(finite_differences), tol=1e-3)
  assert np.count_nonzero(np.asarray(ste)) == 4  # the latents with a pre-activation at theta


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu"])
def test_matryoshka_loss_is_the_sum_of_prefix_fvus(kind):
  prefixes = (2, 5, N)
  config = SAEConfig(d_in=D, num_latents=N, kind=kind, k=K, l1_coeff=0.1, matryoshka=prefixes,
                     matryoshka_coeff=0.7, auxk_coeff=0.0)
  params, x = _params(config), _x()
  x_hat, acts_TN, aux, _ = apply(params, x, config, state=core.init_state(config),
                                          training=True)
  p, acts, x64 = _np(params), np.asarray(acts_TN, np.float64), np.asarray(x, np.float64)
  want = sum(_np_fvu(acts[:, :m] @ p["W_dec"][:m] + p["b_dec"], x64) for m in prefixes[:-1])
  _close(aux["losses"]["matryoshka"], 0.7 * want)
  _close(x_hat, acts @ p["W_dec"] + p["b_dec"])


def _np_orthogonality(w, chunks):
  w = np.asarray(w, np.float64)
  unit = w / np.linalg.norm(w, axis=1, keepdims=True)
  worst = []
  for chunk in chunks:
    for i in chunk:
      worst.append(max((unit[i] @ unit[j]) ** 2 for j in chunk if j != i))
  return np.mean(worst)


def test_orthogonality_penalty_is_the_mean_worst_squared_cosine_within_chunks():
  w = jax.random.normal(jax.random.PRNGKey(6), (N, 3)) * 2.0
  penalty = jax.jit(penalties.orthogonality_penalty, static_argnums=1)
  _close(penalty(w, 1), _np_orthogonality(w, [range(N)]))
  _close(penalty(w, 2), _np_orthogonality(w, [range(4), range(4, 8)]))
  key = jax.random.PRNGKey(7)
  order = np.asarray(jax.random.permutation(key, N))
  _close(penalty(w, 2, key=key),
         _np_orthogonality(w, [order[:4], order[4:]]))
  orthonormal = jnp.eye(4)
  assert float(penalties.orthogonality_penalty(orthonormal, 2)) == 0
  with pytest.raises(ValueError, match="num_chunks=3"):
    penalties.orthogonality_penalty(w, 3)


def test_quasi_orthogonal_k_follows_the_coherence_bound():
  # Three unit vectors in the plane at best 120 degrees apart: mu = 1/2, k < 1.5.
  assert penalties.quasi_orthogonal_k(2, 3) == 1
  # mu = 0.2: k < 3, so 2; mu = 0.1: k < 5.5, so 5.
  assert penalties.quasi_orthogonal_k(64, 4096, coherence=0.2) == 2
  assert penalties.quasi_orthogonal_k(64, 4096, coherence=0.1) == 5
  # GPT-2 width with 32x latents: mu = sqrt(23808 / (768 * 24575)) = 0.03552, k < 14.58.
  assert penalties.quasi_orthogonal_k(768, 24576) == 14
  assert penalties.quasi_orthogonal_k(16, 8) == 8  # N <= d: orthonormal atoms, any k
  with pytest.raises(ValueError, match="coherence=1.5"):
    penalties.quasi_orthogonal_k(16, 32, coherence=1.5)


def test_geometric_median_of_collinear_points_is_their_median():
  direction = np.array([0.6, 0.8])
  points = np.outer([0.0, 1.0, 2.0, 3.0, 100.0], direction) + np.array([1.0, -1.0])
  _close(initializers.geometric_median(points, num_iters=200), 2.0 * direction + [1, -1],
         tol=1e-3)


def test_init_params_is_tied_unit_norm_with_b_dec_at_the_median():
  config = SAEConfig(d_in=D, num_latents=N, kind="jumprelu", l0_coeff=0.1, init_threshold=0.05)
  data = np.tile(np.arange(D, dtype=np.float32), (5, 1))  # all rows equal: the median is a row
  params = initializers.init_params(jax.random.PRNGKey(0), config, data_TD=data)
  assert set(params) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
  _close(np.linalg.norm(params["W_dec"], axis=1), np.ones(N))
  np.testing.assert_array_equal(params["W_enc"], params["W_dec"].T)
  _close(params["b_dec"], np.arange(D))
  _close(np.exp(params["log_threshold"]), np.full(N, 0.05))
  transcoder = SAEConfig(d_in=D, num_latents=N, k=K, d_out=3, skip=True)
  params = initializers.init_params(jax.random.PRNGKey(0), transcoder, data_TD=data)
  assert params["W_enc"].shape == (D, N) and params["W_dec"].shape == (N, 3)
  np.testing.assert_array_equal(params["W_skip"], np.zeros((D, 3)))
  np.testing.assert_array_equal(params["b_dec"], np.zeros(3))  # no target given


def test_active_subspace_init_puts_every_atom_in_the_data_subspace():
  d, rank = 8, 3
  basis = np.linalg.qr(np.random.default_rng(0).normal(size=(d, rank)))[0]  # [d, rank]
  data = np.random.default_rng(1).normal(size=(200, rank)) * [3.0, 2.0, 1.0] @ basis.T + 5.0
  config = SAEConfig(d_in=d, num_latents=16, k=2)
  params = initializers.init_active_subspace(jax.random.PRNGKey(0), config, data)
  w_dec = np.asarray(params["W_dec"], np.float64)
  outside = w_dec - w_dec @ basis @ basis.T
  _close(outside, np.zeros_like(w_dec), tol=1e-5)
  _close(np.linalg.norm(w_dec, axis=1), np.ones(16))
  np.testing.assert_array_equal(params["W_enc"], params["W_dec"].T)
  assert initializers.active_subspace(data).shape == (rank, d)
  assert initializers.active_subspace(data, d_active=2).shape == (2, d)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "gated"}, "kind='gated'"),
    ({"k": 0}, "k=0"),
    ({"k": N + 1}, "k=9"),
    ({"d_in": 0}, "d_in=0"),
    ({"d_in": 2.5}, "d_in=2.5"),
    ({"d_out": -1}, "d_out=-1"),
    ({"skip": True}, "skip=True needs a transcoder"),
    ({"l1_coeff": -1.0}, "l1_coeff=-1.0"),
    ({"l0_coeff": 0.1}, "l0_coeff=0.1 needs kind='jumprelu'"),
    ({"bandwidth": 0.0}, "bandwidth=0.0"),
    ({"auxk": N + 1}, "auxk=9"),
    ({"dead_after_tokens": 0}, "dead_after_tokens=0"),
    ({"threshold_ema": 0.0}, "threshold_ema=0.0"),
    ({"matryoshka": (4, 2)}, "strictly increasing"),
    ({"matryoshka": (0, 4)}, "matryoshka prefix=0"),
    ({"matryoshka": (4, N + 1)}, "above num_latents=8"),
    ({"orthogonality_chunks": 3}, "orthogonality_chunks=3 must divide"),
    ({"orthogonality_chunks": N}, "chunks of at least 2"),
])
def test_bad_settings_are_one_line_value_errors(kwargs, message):
  with pytest.raises(ValueError, match=message) as error:
    SAEConfig(**{"d_in": D, "num_latents": N, "k": K, **kwargs})
  assert "\n" not in str(error.value)


def test_bad_inputs_are_value_errors():
  config = SAEConfig(d_in=D, num_latents=N, kind="batchtopk", k=K)
  params = _params(config)
  with pytest.raises(ValueError, match=r"x_TD must have shape \[T, 4\]"):
    core.sae_apply(params, jnp.zeros((T, D + 1)), config)
  with pytest.raises(ValueError, match="needs state with 'batchtopk_threshold'"):
    core.sae_apply(params, _x(), config)
  with pytest.raises(ValueError, match="must be > 0"):
    core.batchtopk_to_jumprelu(params, core.init_state(config), config)
  skip = SAEConfig(d_in=D, num_latents=N, k=K, d_out=D, skip=True)
  with pytest.raises(ValueError, match="pass x_TD"):
    core.decode(_params(skip), jnp.zeros((T, N)), skip)
  with pytest.raises(ValueError, match="pass target_TD"):
    initializers.init_active_subspace(jax.random.PRNGKey(0), skip, np.ones((T, D)))


def test_state_update_counts_firing_and_dead_latents():
  config = SAEConfig(d_in=D, num_latents=N, kind="topk", k=K, dead_after_tokens=T + 1)
  params, x = _params(config), _x()
  acts = _np_topk(_np_pre(_np(params), x), K)
  fired = np.sum(acts != 0, axis=0)
  state = dict(core.init_state(config), tokens_since_fired=jnp.full(N, 3.0))
  _, _, aux, new_state = apply(params, x, config, state=state, training=True)
  _close(new_state["tokens_since_fired"], np.where(fired > 0, 0.0, 3.0 + T))
  _close(new_state["fire_count"], fired)
  _close(new_state["tokens"], T)
  _close(aux["metrics"]["dead_fraction"], np.mean(fired == 0))
