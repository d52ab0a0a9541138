"""The SparseAutoencoder Linen module: params and their logical axes, the latent state in
"sae_stats" and when it is updated, the OrtSAE rng, and the output against NumPy."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.sae import layers
from sparsejax.sae.config import SAEConfig
from sparsejax.sharding import logical_to_mesh_sharding, make_mesh, with_rules

T, D, N, K = 5, 4, 8, 2
CONFIG = SAEConfig(d_in=D, num_latents=N, kind="topk", k=K, dead_after_tokens=2 * T)


def _numpy_topk_sae(params, x):
  """relu of each token's k largest pre-activations, decoded densely; and the activations."""
  p = {name: np.asarray(nn.meta.unbox(value), np.float64) for name, value in params.items()}
  pre = (np.asarray(x, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
  acts = np.zeros_like(pre)
  for t, row in enumerate(pre):
    top = np.argsort(-row)[:K]
    acts[t, top] = np.maximum(row[top], 0)
  return acts @ p["W_dec"] + p["b_dec"], acts


def test_init_creates_tied_params_with_logical_axes_and_zeroed_state():
  module = layers.SparseAutoencoder(SAEConfig(d_in=D, num_latents=N, kind="jumprelu",
                                              l0_coeff=0.1, d_out=3, skip=True))
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
  specs = nn.get_partition_spec(variables)["params"]
  assert {name: tuple(spec) for name, spec in specs.items()} == {
      "W_enc": ("embed", "latent"), "b_enc": ("latent",), "W_dec": ("latent", "embed"),
      "b_dec": ("embed",), "log_threshold": ("latent",), "W_skip": ("embed", None)}
  params = nn.meta.unbox(variables["params"])
  np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), np.ones(N), rtol=1e-6)
  assert set(variables[layers.STATS]) == {"tokens_since_fired", "fire_count", "tokens"}
  assert all(not np.any(value) for value in variables[layers.STATS].values())
  tied = layers.SparseAutoencoder(CONFIG).init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
  tied = nn.meta.unbox(tied["params"])
  np.testing.assert_array_equal(tied["W_enc"], tied["W_dec"].T)


def test_training_updates_the_latent_state_and_evaluation_does_not():
  module = layers.SparseAutoencoder(CONFIG)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
  variables[layers.STATS]["tokens_since_fired"] = jnp.full((N,), 7.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (T, D))
  apply = jax.jit(module.apply, static_argnames=("deterministic", "mutable"))
  (x_hat, aux), updated = apply(variables, x, deterministic=False, mutable=(layers.STATS,))
  want_x_hat, acts = _numpy_topk_sae(variables["params"], x)
  np.testing.assert_allclose(x_hat, want_x_hat, rtol=1e-5, atol=1e-5)
  fired = np.sum(acts != 0, axis=0)
  stats = updated[layers.STATS]
  np.testing.assert_array_equal(stats["tokens_since_fired"], np.where(fired > 0, 0.0, 7.0 + T))
  np.testing.assert_array_equal(stats["fire_count"], fired)
  assert float(stats["tokens"]) == T
  np.testing.assert_allclose(aux["metrics"]["dead_fraction"], np.mean(fired == 0))
  _, unchanged = apply(variables, x, deterministic=True, mutable=(layers.STATS,))
  for name, value in variables[layers.STATS].items():
    np.testing.assert_array_equal(unchanged[layers.STATS][name], value)


def test_orthogonality_chunks_are_drawn_from_the_dropout_stream_in_training():
  config = SAEConfig(d_in=D, num_latents=N, k=K, orthogonality_coeff=1.0,
                     orthogonality_chunks=2)
  module = layers.SparseAutoencoder(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (T, D))
  variables = module.init(jax.random.PRNGKey(0), x)
  w_dec = np.asarray(nn.meta.unbox(variables["params"])["W_dec"], np.float64)
  unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
  worst_cos2 = lambda chunks: np.mean([max((unit[i] @ unit[j]) ** 2 for j in c if j != i)
                                       for c in chunks for i in c])
  _, aux = module.apply(variables, x)
  np.testing.assert_allclose(aux["losses"]["orthogonality"],
                             worst_cos2([range(4), range(4, 8)]), rtol=1e-5)
  (_, aux), _ = module.apply(variables, x, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(3)}, mutable=(layers.STATS,))
  halves = [sorted(c) for c in itertools.combinations(range(N), N // 2) if 0 in c]
  partitions = [worst_cos2([c, [i for i in range(N) if i not in c]]) for c in halves]
  assert np.min(np.abs(np.array(partitions) - float(aux["losses"]["orthogonality"]))) < 1e-6


def test_sharded_training_step_equals_unsharded():
  """A trainer-style step (unboxed params, FVU plus the aux losses, state mutable) on a
  data=2 x model=4 mesh, latents split over "model", gives the single-device result."""
  config = SAEConfig(d_in=D, num_latents=N, kind="batchtopk", k=K, matryoshka=(4,),
                     dead_after_tokens=1)
  module = layers.SparseAutoencoder(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, D))
  boxed = module.init(jax.random.PRNGKey(0), x)
  variables = nn.meta.unbox(boxed)

  def step(params, stats, x):
    def loss(params):
      (x_hat, aux), updated = module.apply({"params": params, layers.STATS: stats}, x,
                                           deterministic=False, mutable=[layers.STATS])
      fvu = jnp.sum((x_hat - x) ** 2) / jnp.sum((x - x.mean(0)) ** 2)
      return fvu + sum(aux["losses"].values()), updated[layers.STATS]
    return jax.grad(loss, has_aux=True)(params)

  want = jax.jit(step)(variables["params"], variables[layers.STATS], x)
  mesh = make_mesh(data=2, model=4)
  with jax.set_mesh(mesh), with_rules():
    shardings = logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh)
    sharded = jax.device_put(variables, shardings)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
    got = jax.jit(step)(sharded["params"], sharded[layers.STATS], x_sharded)
  assert sharded["params"]["W_dec"].sharding.spec == P("model", "fsdp")
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)
