"""Mixture of LoRA experts: naive per-token reference, B = 0 start, gradients, labels, errors."""
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax.moe  # noqa: F401  (registers "lora_moe")
from sparsejax.models import DenseFFN, TransformerLM
from sparsejax.moe import lora_experts
from sparsejax.registry import FFNS
from tests.moe import reference

B, L, D, F, E, R = 2, 3, 8, 12, 4, 2
NAMES = {"in": ("wi", "wi_gate"), "out": ("wo",)}


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, D)), jnp.float32)


def _make(**kwargs):
  """The layer; the grouped matmul is `kernels.gmm`'s dense reference (faster to compile, tested
  against the XLA and Pallas paths in tests/kernels) unless `implementation` is given."""
  return FFNS.get("lora_moe")(d_model=D, d_ff=F, name="ffn", **{
      "num_experts": E, "rank": R, "tile": 4, "implementation": "reference", **kwargs})


def _random_params(layer, seed):
  """The layer's params, every one (B included) drawn ~ N(0, 0.5^2), unboxed."""
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), _x())["params"])
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(0.5 * rng.normal(size=shapes[name].shape), jnp.float32)
          for name in sorted(shapes)}


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _naive(x_TD, p, experts_TK, gates_TK, keep_TK, kind, targets, scale):
  """Per token: W' = W + scale * sum over kept choices of g A_e B_e, then the FFN, in float64."""
  p = {name: np.asarray(value, np.float64) for name, value in p.items()}
  y = np.zeros_like(x_TD, np.float64)
  for t in range(x_TD.shape[0]):
    w = {name: p[name].copy() for name in ("wi", "wi_gate", "wo") if name in p}
    for k in range(experts_TK.shape[1]):
      if not keep_TK[t, k]:
        continue
      e = experts_TK[t, k]
      for name in (n for target in targets for n in NAMES[target] if n in w):
        w[name] += scale * gates_TK[t, k] * p[name + "_lora_a"][e] @ p[name + "_lora_b"][e]
    h = x_TD[t] @ w["wi"]
    h = _silu(x_TD[t] @ w["wi_gate"]) * h if kind == "swiglu" else _gelu(h)
    y[t] = h @ w["wo"]
  return y


def test_fresh_adapters_compute_the_loaded_dense_ffn():
  dense = DenseFFN(d_model=D, d_ff=F, activation="swiglu", name="ffn")
  dense_params = _random_params(dense, seed=3)
  layer = _make(expert="swiglu", k=2)
  fresh = jax.jit(layer.init)(jax.random.PRNGKey(4), _x())
  params = lora_experts.load_dense_ffn(dense_params, fresh["params"])
  assert not np.any(params["wo_lora_b"]) and np.any(params["wo_lora_a"])
  y, _ = jax.jit(layer.apply)({"params": params}, _x(1))
  no_choice = np.zeros((B * L, 1), int)
  expected = _naive(np.asarray(_x(1)).reshape(-1, D), dense_params, no_choice, no_choice,
                    no_choice.astype(bool), "swiglu", (), 1.0)
  np.testing.assert_allclose(y.reshape(-1, D), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, dense.apply({"params": dense_params}, _x(1))[0], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("kind,k,targets,router,implementation", [
    ("ffn", 1, ("in", "out"), "top_k", "xla"),
    ("swiglu", 2, ("in",), "top_k", "reference"),
    ("swiglu", 1, ("out",), "expert_choice", "reference"),
])
def test_matches_naive_per_token_loop(kind, k, targets, router, implementation):
  layer = _make(expert=kind, k=k, targets=targets, router=router, scale=0.5,
                implementation=implementation)
  params = _random_params(layer, seed=5)
  x = _x(6)
  y, aux = jax.jit(layer.apply)({"params": params}, x)
  x_TD = np.asarray(x, np.float64).reshape(-1, D)
  logits = x_TD @ np.asarray(params["router_DE"], np.float64)
  if router == "top_k":
    experts, gates = reference.top_k(logits, k)
    keep = np.ones(experts.shape, bool)
  else:
    capacity = int(np.ceil(B * L * k / E))
    keep, gates = reference.expert_choice(logits, capacity)
    experts = np.broadcast_to(np.arange(E), keep.shape)
  expected = _naive(x_TD, params, experts, gates, keep, kind, targets, 0.5)
  np.testing.assert_allclose(y.reshape(-1, D), expected, rtol=1e-4, atol=1e-5)
  load = np.bincount(experts[keep], minlength=E) / keep.sum()
  np.testing.assert_allclose(aux["metrics"]["expert_load_E"], load, rtol=1e-6)
  assert set(aux["losses"]) == {"load_balance", "router_z"}
  assert {"router_entropy", "z_loss", "dropped_fraction", "load_max_over_mean"} <= set(
      aux["metrics"])


def test_gradients_match_naive_reference():
  layer = _make(expert="swiglu", k=2, scale=0.5)
  params = _random_params(layer, seed=7)
  x = _x(8)[:1]
  x_TD = x.reshape(-1, D)
  logits = np.asarray(x_TD, np.float64) @ np.asarray(params["router_DE"], np.float64)
  experts, _ = reference.top_k(logits, 2)

  def naive(p):
    """The per-token loop in jnp, choices fixed, gates differentiable through the router."""
    probs_TE = jax.nn.softmax(x_TD @ p["router_DE"], axis=-1)
    rows = []
    for t in range(x_TD.shape[0]):
      w = {name: p[name] for name in ("wi", "wi_gate", "wo")}
      for e in experts[t]:
        for name in w:
          w[name] = w[name] + 0.5 * probs_TE[t, e] * p[name + "_lora_a"][e] @ p[
              name + "_lora_b"][e]
      h = jax.nn.silu(x_TD[t] @ w["wi_gate"]) * (x_TD[t] @ w["wi"])
      rows.append(h @ w["wo"])
    return jnp.sum(jnp.sin(jnp.stack(rows)))

  layer_loss = lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x)[0]))
  grads = jax.jit(jax.grad(layer_loss))(params)
  expected = jax.jit(jax.grad(naive))(params)
  assert set(grads) == set(expected)
  for name in grads:
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.any(grads[name]), name


def test_param_labels_and_adapter_optimizer_freeze_all_but_adapters_and_routers():
  lm = TransformerLM(
      vocab_size=16, d_model=D, num_layers=2, num_heads=2, d_ff=F, max_len=4, ffn="lora_moe",
      ffn_kwargs=(("num_experts", E), ("rank", R)), ffn_layers=(1,))
  shapes = jax.eval_shape(lm.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  labels = lora_experts.param_labels(shapes["params"])
  flat = flax.traverse_util.flatten_dict(labels, sep="/")
  trained = sorted(path for path, label in flat.items() if label == "adapters")
  assert trained == ["layer_1/ffn/" + name for name in (
      "router_DE", "wi_lora_a", "wi_lora_b", "wo_lora_a", "wo_lora_b")]
  assert flat["layer_1/ffn/wi"] == flat["layer_0/ffn/wi"] == flat["embed/embedding"] == "frozen"

  params = nn.unbox(_random_params(_make(), seed=9))
  tx = lora_experts.make_adapter_optimizer(optax.sgd(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, update in updates.items():
    assert np.all(update == 0) == (name in ("wi", "wo")), name


def test_errors():
  x = _x()
  for kwargs, match in [({"rank": 0}, "rank"), ({"targets": ("mid",)}, "targets"),
                        ({"targets": ()}, "targets"), ({"router": "avg_k"}, "avg_k"),
                        ({"k": E + 1}, "k must"), ({"expert": "relu"}, "expert")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(_make(**kwargs).init, jax.random.PRNGKey(0), x)
  # Shared experts and expert parallelism are no lora_moe fields: a clear config error.
  for name, value in [("num_shared_experts", 1), ("expert_parallel", True),
                      ("ep_num_chunks", 2)]:
    with pytest.raises(ValueError, match=f"unknown ffn kwarg '{name}' for ffn 'lora_moe'"):
      TransformerLM(vocab_size=16, d_model=D, num_layers=1, num_heads=2, d_ff=F, max_len=4,
                    ffn="lora_moe", ffn_kwargs=((name, value),))
  with pytest.raises(ValueError, match="no LoRA adapter"):
    lora_experts.param_labels({"ffn": {"wi": jnp.zeros((2, 2))}})
  lora = {"wi": jnp.zeros((D, F)), "wi_lora_a": jnp.zeros((E, D, R))}
  with pytest.raises(ValueError, match="wi: dense shape"):
    lora_experts.load_dense_ffn({"wi": jnp.zeros((D, F + 1))}, lora)
  with pytest.raises(ValueError, match="no counterpart"):
    lora_experts.load_dense_ffn({"wq": jnp.zeros((D, D))}, lora)
  with pytest.raises(ValueError, match="no 'wi_gate'"):
    lora_experts.load_dense_ffn({"wi": jnp.zeros((D, F))}, {**lora, "wi_gate": jnp.zeros((D, F))})
