"""Pure product-key memory functions against brute force, a naive dense read and hand cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.memory import pkm
from tests.memory import reference


def random_case(seed, batch=7, heads=2, num_keys=6, half=4, d_value=5):
  rng = np.random.default_rng(seed)
  query = jnp.asarray(rng.normal(size=(batch, heads, 2 * half)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(heads, 2, num_keys, half)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(num_keys**2, d_value)), jnp.float32)
  return query, keys, values


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    num_keys=st.integers(1, 12),
    half=st.integers(1, 4),
    k_fraction=st.floats(0.0, 1.0),
)
def test_lookup_equals_brute_force_top_k(seed, batch, heads, num_keys, half, k_fraction):
  k = 1 + int(k_fraction * (num_keys - 1))
  query, keys, _ = random_case(seed, batch, heads, num_keys, half)
  scores, idx = pkm.pkm_lookup(query, keys, k)
  want_scores, want_idx, all_scores = reference.np_brute_force_top_k(query, keys, k)
  scores, idx = np.asarray(scores), np.asarray(idx)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  # Tie-robust: each returned slot is distinct and has the score reported for it.
  np.testing.assert_allclose(
      np.take_along_axis(all_scores, idx, axis=-1), scores, rtol=1e-5, atol=1e-5
  )
  assert all(len(set(row)) == k for row in idx.reshape(-1, k))
  gap = want_scores[..., -1:] - np.sort(all_scores, axis=-1)[..., ::-1][..., k : k + 1]
  clear = np.all(gap > 1e-4, axis=-1) if k < num_keys**2 else np.ones(gap.shape[:-1], bool)
  np.testing.assert_array_equal(
      np.sort(idx, axis=-1)[clear], np.sort(want_idx, axis=-1)[clear]
  )


def test_lookup_hand_case():
  # P = 2, one head, A = 1: s1 = q1 * [1, -1] = [2, -2], s2 = q2 * [3, 0] = [3, 0].
  query = jnp.array([[[2.0, 1.0]]])
  keys = jnp.array([[[[1.0], [-1.0]], [[3.0], [0.0]]]])
  scores, idx = pkm.pkm_lookup(query, keys, 2)
  # Slot sums: (0,0)=5 -> slot 0, (0,1)=2 -> slot 1, (1,0)=1 -> slot 2, (1,1)=-2 -> slot 3.
  np.testing.assert_allclose(scores, [[[5.0, 2.0]]])
  np.testing.assert_array_equal(idx, [[[0, 1]]])


def test_read_outputs_and_gradients_equal_naive_dense():
  query, keys, values = random_case(0)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(7, 5)), jnp.float32)
  k = 4

  def loss(read_fn, q, c, v):
    return jnp.sum(read_fn(q, c, v, k)[0] * cotangent)

  out, idx, weights = pkm.pkm_read(query, keys, values, k)
  want_out, want_idx, want_weights = reference.naive_read(query, keys, values, k)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(want_idx, -1))
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(
      pkm.pkm_read, query, keys, values
  )
  want_grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(
      reference.naive_read, query, keys, values
  )
  for name, got, want in zip(("query", "keys", "values"), grads, want_grads):
    assert np.abs(np.asarray(want)).max() > 0, name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_value_gradient_is_zero_outside_the_gathered_rows():
  query, keys, values = random_case(2, batch=3, heads=2, num_keys=8)
  _, idx, _ = pkm.pkm_read(query, keys, values, 3)
  grad_ND = jax.grad(lambda v: jnp.sum(pkm.pkm_read(query, keys, v, 3)[0] ** 2))(values)
  read = np.zeros(values.shape[0], bool)
  read[np.asarray(idx).ravel()] = True
  assert 0 < read.sum() < values.shape[0]
  np.testing.assert_array_equal(np.asarray(grad_ND)[~read], 0.0)
  assert np.all(np.abs(np.asarray(grad_ND)[read]).max(axis=-1) > 0)


def test_embedding_bag_hand_case_and_gradient():
  values = jnp.arange(12.0).reshape(4, 3)
  idx = jnp.array([[0, 2], [3, 3]])
  weights = jnp.array([[0.5, 0.25], [1.0, 2.0]])
  out = pkm.embedding_bag(values, idx, weights)
  np.testing.assert_allclose(out, [[0.0 + 1.5, 0.5 + 1.75, 1.0 + 2.0], [27.0, 30.0, 33.0]])
  grad = jax.grad(lambda v: jnp.sum(pkm.embedding_bag(v, idx, weights)))(values)
  np.testing.assert_allclose(grad[:, 0], [0.5, 0.0, 0.25, 3.0])


def test_access_stats_hand_case():
  # N = 4; two reads of slot 0 (weights 0.5, 0.5), one of slot 1 (weight 1.0).
  idx = jnp.array([[[0, 0]], [[1, 1]]])
  weights = jnp.array([[[0.5, 0.5]], [[1.0, 0.0]]])
  stats = pkm.access_stats(idx, weights, 4)
  np.testing.assert_allclose(stats["memory_usage"], 0.5)
  np.testing.assert_allclose(stats["top_slot_share"], 0.5)
  np.testing.assert_allclose(stats["access_entropy"], np.log(2) / np.log(4), rtol=1e-6)


def test_access_stats_match_numpy_histograms():
  rng = np.random.default_rng(7)
  idx = rng.integers(0, 50, size=(6, 2, 4))
  weights = rng.random(size=(6, 2, 4)).astype(np.float32)
  mass = np.zeros(64)
  np.add.at(mass, idx.reshape(-1), weights.reshape(-1).astype(np.float64))
  p = mass / mass.sum()
  stats = jax.jit(pkm.access_stats, static_argnums=2)(jnp.asarray(idx), jnp.asarray(weights), 64)
  np.testing.assert_allclose(stats["memory_usage"], len(np.unique(idx)) / 64)
  np.testing.assert_allclose(stats["top_slot_share"], p.max(), rtol=1e-6)
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(64)
  np.testing.assert_allclose(stats["access_entropy"], entropy, rtol=1e-5)


def test_read_is_jittable_and_vmappable():
  query, keys, values = random_case(3)
  want = pkm.pkm_read(query, keys, values, 2)[0]
  read = jax.jit(lambda q: pkm.pkm_read(q, keys, values, 2)[0])
  np.testing.assert_allclose(read(query), want, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(read)(query[:, None])[:, 0], want, rtol=1e-6)


def test_non_square_memory_size_is_an_error():
  assert pkm.num_subkeys(65536) == 256
  with pytest.raises(ValueError, match=r"memory_size=1000 is not a perfect square.*961 or 1024"):
    pkm.num_subkeys(1000)
  query, keys, _ = random_case(0, num_keys=6)
  with pytest.raises(ValueError, match=r"values has N=35 rows .* P\^2=36"):
    pkm.pkm_read(query, keys, jnp.zeros((35, 5)), 2)


@pytest.mark.parametrize("k", [0, 7, -1])
def test_k_outside_one_to_num_keys_is_an_error(k):
  query, keys, values = random_case(0, num_keys=6)
  with pytest.raises(ValueError, match=rf"k must be an int in \[1, num_keys=6\].*got {k}"):
    pkm.pkm_lookup(query, keys, k)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, num_keys=6\]"):
    pkm.pkm_read(query, keys, values, k)


def test_mismatched_shapes_are_errors():
  query, keys, values = random_case(0, half=4)
  with pytest.raises(ValueError, match=r"query must have shape \(\.\.\., H=2, Q=8\)"):
    pkm.pkm_lookup(query[..., :6], keys, 2)
  with pytest.raises(ValueError, match=r"keys must have shape \(H, 2, P, A\)"):
    pkm.pkm_lookup(query, keys[:, :1], 2)
  with pytest.raises(ValueError, match="idx and weights must have the same shape"):
    pkm.embedding_bag(values, jnp.zeros((3, 2), jnp.int32), jnp.zeros((3, 1)))
