"""FUSED: layer sensitivity by hand, removable adapters leave base weights and outputs bit-exact."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.finetune import fused
from sparsejax.models.mlp import MLP


def test_sensitivity_and_ranking_by_hand():
  base = {"l0": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
          "l1": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
  tuned_a = {"l0": {"kernel": jnp.array([[1.0, 0.0], [-2.0, 4.0]]), "bias": jnp.array([1.0, 0.0])},
             "l1": {"kernel": jnp.zeros((2, 3)), "bias": jnp.array([0.5, -0.5, 0.0])}}
  tuned_b = {"l0": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
             "l1": {"kernel": jnp.array([[0.0, 1.0, 0.0], [0.0, -1.0, 1.0]]),
                    "bias": jnp.zeros(3)}}
  # l0, copy a: per-output L1 over inputs (3, 4) -> L2 5; bias L1 1 -> 6. Copy b: 0. Mean 3.
  # l1, copy a: bias 1. Copy b: per-output L1 (0, 2, 1) -> sqrt(5). Mean (1 + sqrt 5) / 2.
  sens = fused.layer_sensitivity(base, [tuned_a, tuned_b])
  assert sens["l0"] == pytest.approx(3.0)
  assert sens["l1"] == pytest.approx((1 + np.sqrt(5)) / 2)
  assert fused.rank_layers(sens) == ["l0", "l1"]
  assert fused.rank_layers({"b": 1.0, "a": 1.0, "c": 2.0}) == ["c", "a", "b"]
  with pytest.raises(ValueError, match=r"layer 'l0/bias' has no 2-D 'kernel'"):
    fused.init_adapters(jax.random.key(0), base, ["l0/bias"], rank=2)
  with pytest.raises(ValueError, match=r"rank must be an int >= 1, got 0"):
    fused.init_adapters(jax.random.key(0), base, ["l0"], rank=0)


def _bits(tree):
  return [np.asarray(leaf).view(np.uint32).copy() for leaf in jax.tree.leaves(tree)]


def test_adapters_unlearn_and_their_removal_is_bit_exact():
  model = MLP(num_classes=3, hidden=(8,))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  y = jnp.asarray(np.arange(12) % 3)
  base = model.init(jax.random.key(0), x)["params"]
  base_bits = _bits(base)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  original = np.asarray(forward(base, x))

  def loss(p, batch):
    logits = model.apply({"params": p}, batch[0])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  # The copy tuned on the data to forget (one SGD step here) says which layer it moved most.
  forget = (x[y == 0], y[y == 0])
  tuned = jax.tree.map(lambda p, g: p - 0.5 * g, base, jax.jit(jax.grad(loss))(base, forget))
  adapted, other = fused.rank_layers(fused.layer_sensitivity(base, [tuned]))
  adapters = fused.init_adapters(jax.random.key(1), base, [adapted], rank=2)
  np.testing.assert_array_equal(forward(fused.attach(base, adapters), x), original)  # b = 0
  retain = y != 0                                              # forget class 0
  batch = (x[retain], y[retain])
  tx = optax.adam(0.1)
  step = fused.make_unlearning_step(loss, tx)
  opt_state = tx.init(adapters)
  losses = []
  for _ in range(4):
    adapters, opt_state, value = step(base, adapters, opt_state, batch)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  merged = fused.attach(base, adapters)
  assert merged[other]["kernel"] is jax.tree.leaves(base[other]["kernel"])[0]
  assert not np.allclose(forward(merged, x), original)
  # Removal: the base was never written, so its bits and the model's outputs are the original's.
  for before, after in zip(base_bits, _bits(base)):
    np.testing.assert_array_equal(before, after)
  np.testing.assert_array_equal(np.asarray(forward(base, x)).view(np.uint32),
                                original.view(np.uint32))
