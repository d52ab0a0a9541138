"""SAE dictionary analysis against brute force, NumPy/SciPy references and hand-worked cases."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from sparsejax.sae import analysis


def _np_sae(params, x_TD):
  """Dense NumPy SAE: JumpReLU when params hold log_threshold, else ReLU; (acts, x_hat)."""
  p = {name: np.asarray(value, np.float64) for name, value in params.items()}
  pre_TN = x_TD @ p["W_enc"] + p["b_enc"]
  if "log_threshold" in p:
    acts_TN = pre_TN * (pre_TN > np.exp(p["log_threshold"]))
  else:
    acts_TN = np.maximum(pre_TN, 0.0)
  x_hat = acts_TN @ p["W_dec"] + p["b_dec"]
  if "W_skip" in p:
    x_hat = x_hat + x_TD @ p["W_skip"]
  return acts_TN, x_hat


def _random_params(seed, d_in, num_latents, *, jumprelu=True, d_out=None):
  rng = np.random.default_rng(seed)
  d_out = d_out or d_in
  params = {"W_enc": rng.normal(size=(d_in, num_latents)),
            "b_enc": rng.normal(size=num_latents) * 0.1,
            "W_dec": rng.normal(size=(num_latents, d_out)),
            "b_dec": rng.normal(size=d_out) * 0.1}
  if jumprelu:
    params["log_threshold"] = rng.normal(size=num_latents) * 0.3
  return params


def _reparametrise(params, perm, scale):
  """Latent j of the result is latent perm[j] of params with its encoder scaled by scale[j] (and
  its threshold too) and its decoder row divided by it: the same SAE function, shuffled."""
  out = {"W_enc": params["W_enc"][:, perm] * scale, "b_enc": params["b_enc"][perm] * scale,
         "W_dec": params["W_dec"][perm] / scale[:, None], "b_dec": params["b_dec"]}
  if "log_threshold" in params:
    out["log_threshold"] = params["log_threshold"][perm] + np.log(scale)
  return out


def _np_cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- matching


def test_match_features_equals_brute_force_over_all_permutations():
  rng = np.random.default_rng(0)
  W_a, W_b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  best = max(itertools.permutations(range(5)),
             key=lambda p: sum(_np_cos(W_a[i], W_b[p[i]]) for i in range(5)))
  perm, cosines = analysis.match_features(W_a, W_b)
  np.testing.assert_array_equal(perm, best)
  np.testing.assert_allclose(cosines, [_np_cos(W_a[i], W_b[best[i]]) for i in range(5)], atol=1e-12)


def test_match_features_recovers_a_permuted_rescaled_copy_among_extra_atoms():
  rng = np.random.default_rng(1)
  W_a = rng.normal(size=(6, 4))
  p = rng.permutation(6)
  W_b = np.concatenate([W_a[p] * rng.uniform(0.2, 5.0, size=(6, 1)), rng.normal(size=(3, 4))])
  perm, cosines = analysis.match_features(W_a, W_b)
  np.testing.assert_array_equal(perm, np.argsort(p))  # b's row j is a's row p[j]
  np.testing.assert_allclose(cosines, 1.0, atol=1e-12)


@pytest.mark.parametrize("shape_a, shape_b, message", [
    ((5, 3), (4, 3), "more than W_dec_b's 4"),
    ((4, 3), (4, 2), "W_dec_b's D must match"),
    ((4,), (4, 3), "W_dec_a must have shape"),
])
def test_match_features_rejects_bad_shapes(shape_a, shape_b, message):
  with pytest.raises(ValueError, match=message):
    analysis.match_features(np.ones(shape_a), np.ones(shape_b))


@pytest.mark.parametrize("jumprelu", [True, False])
def test_fold_parameters_keeps_the_reconstruction(jumprelu):
  params = _random_params(2, d_in=4, num_latents=6, jumprelu=jumprelu)
  x_TD = np.random.default_rng(3).normal(size=(32, 4)) * 2
  acts, x_hat = _np_sae(params, x_TD)
  assert 0 < np.mean(acts > 0) < 1  # some latents fire, some do not
  folded = analysis.fold_parameters(params)
  np.testing.assert_allclose(_np_sae(folded, x_TD)[1], x_hat, rtol=1e-5, atol=1e-5)
  if jumprelu:
    np.testing.assert_array_equal(folded["log_threshold"], 0.0)
    np.testing.assert_allclose(folded["W_dec"], params["W_dec"]
                               * np.exp(params["log_threshold"])[:, None], rtol=1e-6)
  else:
    np.testing.assert_allclose(np.linalg.norm(folded["W_enc"], axis=0), 1.0, rtol=1e-6)


def test_sae_match_recovers_a_reparametrised_permuted_layer():
  rng = np.random.default_rng(4)
  params_a = _random_params(5, d_in=3, num_latents=5)
  p, scale = rng.permutation(5), np.array([0.1, 8.0, 0.3, 5.0, 1.0])
  params_b = _reparametrise(params_a, p, scale)
  x_TD = rng.normal(size=(16, 3)) * 2
  np.testing.assert_allclose(_np_sae(params_b, x_TD)[1], _np_sae(params_a, x_TD)[1], atol=1e-9)
  perm, cosines = analysis.sae_match(params_a, params_b)
  np.testing.assert_array_equal(perm, np.argsort(p))
  np.testing.assert_allclose(cosines, 1.0, atol=1e-6)


def test_sae_match_folds_thresholds_where_raw_decoder_mse_mismatches():
  params_a = {"W_enc": np.eye(2), "b_enc": np.zeros(2), "W_dec": np.array([[1.0, 0.0], [3.0, 0.3]]),
              "b_dec": np.zeros(2), "log_threshold": np.zeros(2)}
  params_b = _reparametrise(params_a, np.arange(2), np.array([0.2, 5.0]))
  # Raw decoders [[5, 0], [0.6, 0.06]]: identity costs 16 + 5.81, the swap only 0.16 + 4.09.
  raw_cost = lambda q: np.sum((params_a["W_dec"] - params_b["W_dec"][q]) ** 2)
  assert raw_cost([1, 0]) < raw_cost([0, 1])
  perm, _ = analysis.sae_match(params_a, params_b)
  np.testing.assert_array_equal(perm, [0, 1])


def test_sae_match_minimises_folded_decoder_mse_over_all_permutations():
  params_a, params_b = _random_params(6, 3, 5), _random_params(7, 3, 5)
  fold = lambda p: p["W_dec"] * np.exp(p["log_threshold"])[:, None]
  best = min(itertools.permutations(range(5)),
             key=lambda q: np.sum((fold(params_a) - fold(params_b)[list(q)]) ** 2))
  perm, cosines = analysis.sae_match(params_a, params_b)
  np.testing.assert_array_equal(perm, best)
  np.testing.assert_allclose(
      cosines, [_np_cos(params_a["W_dec"][i], params_b["W_dec"][best[i]]) for i in range(5)],
      atol=1e-6)


def test_match_layers_gives_each_adjacent_pair_and_chains():
  rng = np.random.default_rng(8)
  layer_0 = _random_params(9, 4, 6)
  p1, p2 = rng.permutation(6), rng.permutation(6)
  layer_1 = _reparametrise(layer_0, p1, rng.uniform(0.5, 2.0, 6))
  layer_2 = _reparametrise(layer_1, p2, rng.uniform(0.5, 2.0, 6))
  perms, mean_cosines = analysis.match_layers([layer_0, layer_1, layer_2])
  np.testing.assert_array_equal(perms[0], np.argsort(p1))
  np.testing.assert_array_equal(perms[1], np.argsort(p2))
  np.testing.assert_allclose(mean_cosines, [1.0, 1.0], atol=1e-6)
  chained = perms[1][perms[0]]
  for i in range(6):
    assert _np_cos(layer_0["W_dec"][i], layer_2["W_dec"][chained[i]]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="at least 2 SAEs"):
    analysis.match_layers([layer_0])


def test_permute_latents_gives_the_same_reconstruction_with_permuted_acts():
  params = _random_params(10, d_in=4, num_latents=7, d_out=3)
  params["W_skip"] = np.random.default_rng(11).normal(size=(4, 3))
  perm = np.random.default_rng(12).permutation(7)
  x_TD = np.random.default_rng(13).normal(size=(20, 4)) * 2
  acts, x_hat = _np_sae(params, x_TD)
  new_acts, new_x_hat = _np_sae(analysis.permute_latents(params, perm), x_TD)
  np.testing.assert_allclose(new_x_hat, x_hat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_acts, acts[:, perm], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="perm must be a permutation of 0 .. 6"):
    analysis.permute_latents(params, [0, 0, 1, 2, 3, 4, 5])
  with pytest.raises(ValueError, match="'W_gate'"):
    analysis.permute_latents({**params, "W_gate": np.ones(7)}, perm)


# ---------------------------------------------------------------- similarity


def _cca_reference(x_TN, y_TM, keep):
  """SVD-reduce each centred set to `keep` dims, then CCA from the covariance blocks:
  rho = singular values of Cxx^-1/2 Cxy Cyy^-1/2."""
  def reduce(z):
    z = z - z.mean(axis=0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    return u[:, :keep] * s[:keep]
  x, y = reduce(x_TN), reduce(y_TM)
  inv_sqrt = lambda c: np.linalg.inv(np.real(scipy.linalg.sqrtm(c)))
  cxx, cyy, cxy = x.T @ x, y.T @ y, x.T @ y
  return np.linalg.svd(inv_sqrt(cxx) @ cxy @ inv_sqrt(cyy), compute_uv=False)


def test_svcca_matches_a_covariance_cca_reference():
  rng = np.random.default_rng(14)
  x_TN = rng.normal(size=(200, 6)) * np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.2])
  y_TM = x_TN[:, :4] @ rng.normal(size=(4, 5)) + rng.normal(size=(200, 5))
  similarity, rho = analysis.svcca(x_TN, y_TM, keep=3)
  want = _cca_reference(x_TN, y_TM, 3)
  np.testing.assert_allclose(rho, want, atol=1e-4)
  assert float(similarity) == pytest.approx(np.mean(want), abs=1e-4)


def test_svcca_is_one_for_a_rotated_rescaled_copy_and_low_for_independent_noise():
  rng = np.random.default_rng(15)
  x_TN = rng.normal(size=(400, 8))
  rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  similarity, rho = analysis.svcca(x_TN, (x_TN @ rotation) * rng.uniform(0.1, 10.0, 8), keep=8)
  np.testing.assert_allclose(rho, 1.0, atol=1e-4)
  noise_similarity, _ = analysis.svcca(x_TN, rng.normal(size=(400, 8)), keep=4)
  assert float(noise_similarity) < 0.2
  with pytest.raises(ValueError, match="keep must be an int"):
    analysis.svcca(x_TN, x_TN, keep=9)


# ---------------------------------------------------------------- geometry


def test_cosine_stats_and_nearest_neighbours_match_a_dense_numpy_matrix():
  W = np.random.default_rng(16).normal(size=(7, 3))
  unit = W / np.linalg.norm(W, axis=1, keepdims=True)
  cos = unit @ unit.T
  off = ~np.eye(7, dtype=bool)
  stats = analysis.pairwise_cosine_stats(W, block=3)  # 3 blocks, the last one padded
  assert float(stats["mean_cosine"]) == pytest.approx(cos[off].mean(), abs=1e-6)
  assert float(stats["mean_abs_cosine"]) == pytest.approx(np.abs(cos[off]).mean(), abs=1e-6)
  assert float(stats["max_cosine"]) == pytest.approx(cos[off].max(), abs=1e-6)
  masked = np.where(off, cos, -np.inf)
  nn_idx, nn_cos = analysis.nearest_neighbour_cosines(W, block=3)
  np.testing.assert_array_equal(nn_idx, masked.argmax(axis=1))
  np.testing.assert_allclose(nn_cos, masked.max(axis=1), atol=1e-6)
  assert float(stats["mean_nn_cosine"]) == pytest.approx(masked.max(axis=1).mean(), abs=1e-6)


def test_spherical_kmeans_step_matches_a_numpy_step_including_an_empty_cluster():
  rng = np.random.default_rng(17)
  W = np.abs(rng.normal(size=(12, 3))) + np.array([2.0, 0.0, 0.0])  # all near +x
  centroids = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
  unit = W / np.linalg.norm(W, axis=1, keepdims=True)
  assign = np.argmax(unit @ centroids.T, axis=1)
  want = centroids.copy()
  for c in range(3):
    if np.any(assign == c):
      total = unit[assign == c].sum(axis=0)
      want[c] = total / np.linalg.norm(total)
  assert not np.any(assign == 2)
  new_centroids, got_assign = analysis.spherical_kmeans_step(W, centroids)
  np.testing.assert_array_equal(got_assign, assign)
  np.testing.assert_allclose(new_centroids, want, atol=1e-6)


def test_spherical_kmeans_recovers_three_known_direction_clusters():
  rng = np.random.default_rng(18)
  directions = np.linalg.qr(rng.normal(size=(4, 3)))[0].T  # 3 orthonormal directions in 4 dims
  labels = np.repeat(np.arange(3), 5)
  W = (directions[labels] + 0.05 * rng.normal(size=(15, 4))) * rng.uniform(0.5, 3.0, (15, 1))
  order = rng.permutation(15)
  centroids, assign = analysis.spherical_kmeans(W[order], 3, key=jax.random.PRNGKey(0),
                                                num_iters=5)
  assign, labels = np.asarray(assign), labels[order]
  for c in range(3):  # each found cluster is exactly one true cluster
    assert len(set(labels[assign == c])) == 1 and np.sum(assign == c) == 5
    assert abs(np.asarray(centroids[c]) @ directions[labels[assign == c][0]]) > 0.99


# ---------------------------------------------------------------- contexts


def test_top_activating_contexts_by_hand():
  acts = np.zeros((10, 2))
  acts[[1, 4, 9], 1] = [5.0, 3.0, 4.0]
  acts[:, 0] = np.arange(10)
  tokens = np.arange(10) + 100
  contexts, values, positions = analysis.top_activating_contexts(acts, tokens, 1, k=3, window=1)
  np.testing.assert_array_equal(positions, [1, 9, 4])
  np.testing.assert_array_equal(values, [5.0, 4.0, 3.0])
  np.testing.assert_array_equal(contexts, [[100, 101, 102], [108, 109, -1], [103, 104, 105]])
  every = jax.vmap(lambda n: analysis.top_activating_contexts(acts, tokens, n, 1, 2)[0])(
      jnp.arange(2))  # latent 0 peaks at t = 9, latent 1 at t = 1
  np.testing.assert_array_equal(every[:, 0], [[107, 108, 109, -1, -1], [-1, 100, 101, 102, 103]])
  with pytest.raises(ValueError, match="k must be an int"):
    analysis.top_activating_contexts(acts, tokens, 1, k=11, window=1)


def test_polysemy_by_hand():
  acts = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  context_ids = np.array([0, 1, 1, 0])
  entropy, effective = analysis.polysemy(acts, context_ids, num_contexts=3)
  h0 = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))  # latent 0: mass 1 in class 0, 3 in class 1
  # latent 1: mass 2 in each of classes 0 and 1; latent 2 never fires
  np.testing.assert_allclose(entropy, [h0, np.log(2.0), 0.0], atol=1e-6)
  np.testing.assert_allclose(effective, [np.exp(h0), 2.0, 0.0], atol=1e-6)
  single, _ = analysis.polysemy(acts[:, :1], np.array([2, 2, 2, 2]), num_contexts=3)
  np.testing.assert_allclose(single, [0.0], atol=1e-7)


# ---------------------------------------------------------------- interventions


def test_attribution_patching_equals_exact_ablation_for_a_linear_function():
  rng = np.random.default_rng(19)
  acts, w = np.abs(rng.normal(size=(3, 4))), rng.normal(size=(3, 4))
  f = lambda a: jnp.sum(a * w) + 0.7
  exact = np.zeros((3, 4))
  for t, n in itertools.product(range(3), range(4)):
    ablated = acts.copy()
    ablated[t, n] = 0.0
    exact[t, n] = float(f(acts)) - float(f(ablated))
  np.testing.assert_allclose(analysis.attribute_latents(f, acts), exact, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_is_exact_for_a_separable_quadratic_and_one_step_is_not():
  acts, c = np.array([[1.0, 2.0, 0.5]]), np.array([[0.5, -1.0, 2.0]])
  f = lambda a: jnp.sum(c * a**2)
  exact = c * acts**2  # f(a) - f(a with a_n = 0), one latent at a time
  np.testing.assert_allclose(analysis.attribute_latents(f, acts, steps=4), exact, rtol=1e-6)
  np.testing.assert_allclose(analysis.attribute_latents(f, acts), 2 * exact, rtol=1e-6)
  baseline = np.array([[1.0, 1.0, 1.0]])  # patching to a baseline: f(a) - f(a with a_n = b_n)
  np.testing.assert_allclose(analysis.attribute_latents(f, acts, baseline_TN=baseline, steps=3),
                             c * (acts**2 - baseline**2), rtol=1e-6)


def test_steer_fn_adds_the_scaled_atom_at_every_position():
  steer = analysis.steer_fn(np.array([1.0, -2.0, 0.0]), 0.5)
  x = np.arange(6.0).reshape(2, 3)
  np.testing.assert_allclose(steer(x), x + np.array([0.5, -1.0, 0.0]))
  with pytest.raises(ValueError, match="x's last dim must match"):
    steer(np.ones((2, 4)))


def test_steering_effect_by_hand():
  clean = np.array([[0.0, 0.0], [0.0, 0.0]])  # p = (1/2, 1/2) at both positions
  steered = np.array([[np.log(3.0), 0.0], [0.0, 0.0]])  # q = (3/4, 1/4), then unchanged
  effect = analysis.steering_effect(clean, steered, [0, 1])
  kl_first = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
  assert float(effect["kl"]) == pytest.approx(kl_first / 2, abs=1e-6)
  np.testing.assert_allclose(effect["delta_logprob"],
                             [np.log(1.5) / 2, np.log(0.5) / 2], atol=1e-6)


# ---------------------------------------------------------------- CRISP


def test_crisp_feature_stats_and_selection_by_hand():
  acts = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
  count, total = analysis.feature_stats(acts, mask_T=np.array([1, 1, 0]))
  np.testing.assert_array_equal(count, [2, 0, 1])
  np.testing.assert_array_equal(total, [4, 0, 2])
  # Latent: 0     1     2     3     4 (never fires)
  count_t = [9.0, 9.0, 5.0, 1.0, 0.0]
  sum_t = [10.0, 30.0, 30.0, 9.0, 0.0]
  count_b = [1.0, 2.0, 0.0, 0.0, 0.0]
  sum_b = [4.0, 5.0, 0.0, 0.0, 0.0]
  # Frequency differences 8, 7, 5, 1; activation ratios 2, 5, 30, 9: latent 0 fails min_ratio = 3.
  ids = analysis.select_crisp_features(count_t, sum_t, count_b, sum_b, 2)
  np.testing.assert_array_equal(ids, [1, 2])
  # With candidate_factor=1 only the top-2 by frequency difference (0, 1) are candidates.
  ids = analysis.select_crisp_features(count_t, sum_t, count_b, sum_b, 2, candidate_factor=1)
  np.testing.assert_array_equal(ids, [1])


def test_crisp_loss_by_hand_and_its_gradient_touches_only_chosen_firing_latents():
  target = np.array([[2.0, 9.0, 0.0], [4.0, 9.0, 1.0], [6.0, 9.0, 0.0]])
  benign = np.array([[1.0, 0.0, 3.0], [2.0, 0.0, 1.0]])
  benign_ref = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  mask_target = np.array([1, 1, 0])  # the last target token (e.g. padding) is left out
  loss, parts = analysis.crisp_loss(target, benign, benign_ref, [0, 2], beta=0.75,
                                    mask_target_T=mask_target)
  suppress = (2.0 + 4.0 + 1.0) / 3  # firing entries of latents 0 and 2 on the kept tokens
  retain = (0.0 + 4.0 + 4.0 + 0.0) / 4
  assert float(parts["suppress"]) == pytest.approx(suppress)
  assert float(parts["retain"]) == pytest.approx(retain)
  assert float(loss) == pytest.approx(0.25 * suppress + 0.75 * retain)
  grad = jax.grad(lambda a: analysis.crisp_loss(a, benign, benign_ref, [0, 2], beta=0.75,
                                                mask_target_T=mask_target)[0])(jnp.asarray(target))
  want = np.zeros((3, 3))
  want[[0, 1, 1], [0, 0, 2]] = 0.25 / 3
  np.testing.assert_allclose(grad, want, atol=1e-7)
  with pytest.raises(ValueError, match="beta must be in"):
    analysis.crisp_loss(target, benign, benign_ref, [0], beta=1.5)


# ---------------------------------------------------------------- CSR codes


def test_sparse_codes_keep_each_rows_k_largest():
  acts = np.array([[0.1, 3.0, 2.0, 0.0], [5.0, 1.0, 4.0, 2.0]])
  codes = analysis.sparse_codes(acts, [1, 2])
  np.testing.assert_array_equal(codes[1], [[0, 3, 0, 0], [5, 0, 0, 0]])
  np.testing.assert_array_equal(codes[2], [[0, 3, 2, 0], [5, 0, 4, 0]])
  with pytest.raises(ValueError, match="each k in ks must be an int"):
    analysis.sparse_codes(acts, [5])


def test_retrieval_accuracy_by_cosine_nearest_neighbour_by_hand():
  corpus = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
  labels_corpus = np.array([0, 1, 2, 1])
  query = np.array([[3.0, 0.1, 0.0],   # nearest: corpus 0 (label 0): hit
                    [0.0, 0.2, 1.0],   # nearest: corpus 2 (label 2), second corpus 3 (label 1)
                    [0.0, 0.0, 0.0]])  # zero code: cosine 0 everywhere, nearest corpus 0, 1
  labels_query = np.array([0, 1, 2])
  assert float(analysis.retrieval_accuracy(query, corpus, labels_query, labels_corpus)) == (
      pytest.approx(1 / 3))
  assert float(analysis.retrieval_accuracy(query, corpus, labels_query, labels_corpus, k=2)) == (
      pytest.approx(2 / 3))
