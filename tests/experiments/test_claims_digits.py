"""Claims soft_moe_cnn and erk_vs_uniform: judges and tables on hand-made payloads, ERK layer
densities by hand, and the two library pieces they need (SmallCNN on flat inputs, a Soft MoE
normalisation with a finite gradient at zero)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.claims import erk_vs_uniform
from experiments.claims import soft_moe_cnn
from sparsejax.models import SmallCNN
from sparsejax.moe import soft


def _rows(key, name, accuracies, **extra):
  return [{key: name, "seed": i, "test_accuracy": a, **extra} for i, a in enumerate(accuracies)]


def _soft_payload(soft_acc, top_k, expert_choice):
  runs = (_rows("arm", "dense", [0.90, 0.91, 0.92]) + _rows("arm", "top_k", top_k)
          + _rows("arm", "expert_choice", expert_choice) + _rows("arm", "soft_moe", soft_acc))
  return {"runs": runs, "num_steps": 10, "num_blocks": 2}


def test_soft_moe_judge_and_table_on_hand_made_payloads():
  # Soft MoE 95 ± 1, top-k 90 ± 1, EC 92 ± 1: leads of 5 and 3 pp > 1 + 1 -> yes.
  clear = _soft_payload([0.94, 0.95, 0.96], [0.89, 0.90, 0.91], [0.91, 0.92, 0.93])
  verdict, text = soft_moe_cnn.judge(clear)
  assert verdict == "yes" and "Soft MoE 95.00 %" in text and "expert choice 92.00 %" in text
  table = soft_moe_cnn.table(clear)
  assert "| Soft MoE | 95.00 ± 1.00 |  |" in table
  assert "| top-1 token choice | 90.00 ± 1.00 | +5.00 |" in table
  # Ahead of top-k by 1 pp but inside the spread (1 + 1), behind EC -> partly.
  assert soft_moe_cnn.judge(
      _soft_payload([0.90, 0.91, 0.92], [0.89, 0.90, 0.91], [0.92, 0.93, 0.94]))[0] == "partly"
  # Behind both -> no.
  assert soft_moe_cnn.judge(
      _soft_payload([0.80, 0.81, 0.82], [0.89, 0.90, 0.91], [0.91, 0.92, 0.93]))[0] == "no"
  # One seed: no spread, so a lead is at best partly.
  one = _soft_payload([0.95], [0.90], [0.92])
  assert soft_moe_cnn.judge(one)[0] == "partly"


def _erk_payload(erk_high, uniform_high):
  runs = _rows("distribution", "dense", [0.99, 0.99, 0.99], sparsity=0.0)
  for dist, low, high in (("erk", [0.98, 0.98, 0.98], erk_high),
                          ("uniform", [0.97, 0.98, 0.99], uniform_high)):
    runs += _rows("distribution", dist, low, sparsity=0.8)
    runs += _rows("distribution", dist, high, sparsity=0.98)
  heads = {"erk": (1.0, 0.126), "uniform": (0.2, 0.02)}
  densities = {d: {"0.8": {"head/kernel": a}, "0.98": {"head/kernel": b}}
               for d, (a, b) in heads.items()}
  return {"runs": runs, "sparsities": [0.8, 0.98], "layer_densities": densities, "num_steps": 9}


def test_erk_judge_and_table_on_hand_made_payloads():
  # 98 %: ERK 72 ± 2, uniform 32 ± 2 -> +40 pp > 4; 80 %: gap 0 -> grows -> yes.
  clear = _erk_payload([0.70, 0.72, 0.74], [0.30, 0.32, 0.34])
  verdict, text = erk_vs_uniform.judge(clear)
  assert verdict == "yes" and "+40.00 pp at 98%" in text and "beyond" in text
  table = erk_vs_uniform.table(clear)
  assert "| 98% | 72.00 ± 2.00 | 32.00 ± 2.00 | +40.00 | 12.6% / 2.0% |" in table
  assert "| 80% | 98.00 ± 0.00 | 98.00 ± 1.00 | +0.00 | 100.0% / 20.0% |" in table
  # ERK ahead by 1 pp with stds of 2 -> inside the spread -> partly.
  assert erk_vs_uniform.judge(_erk_payload([0.70, 0.72, 0.74], [0.69, 0.71, 0.73]))[0] == "partly"
  # ERK behind at the highest sparsity -> no.
  assert erk_vs_uniform.judge(_erk_payload([0.30, 0.32, 0.34], [0.70, 0.72, 0.74]))[0] == "no"


def test_erk_layer_densities_match_hand_worked_erk():
  # LeNet-300-100 kernels 64x300, 300x100, 100x10 at 10 % density: 5020 kept of 50200. ERK:
  # d_l = eps (in + out) / (in out), eps = 5020 / (364 + 400 + 110), no layer capped at 1.
  got = erk_vs_uniform.layer_densities(0.1, "erk")
  eps = 5020 / 874
  want = {"layer_0/kernel": eps * 364 / 19200, "layer_1/kernel": eps * 400 / 30000,
          "head/kernel": eps * 110 / 1000}
  assert set(got) == set(want)
  for path, density in want.items():
    assert got[path] == pytest.approx(density, abs=2e-4)  # integer counts, rounded to 5 digits
  assert set(erk_vs_uniform.layer_densities(0.1, "uniform").values()) == {0.1}


def test_small_cnn_takes_flat_images_and_rejects_bad_image_shapes():
  images = np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype(np.float32)
  model = SmallCNN(num_classes=3, channels=4, d_ff=8, num_blocks=1)
  flat = model.clone(image_shape=(4, 4, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  logits_flat = jax.jit(flat.apply)(variables, images.reshape(2, 16))[0]
  np.testing.assert_allclose(logits_flat, jax.jit(model.apply)(variables, images)[0],
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="image_shape"):
    SmallCNN(num_classes=3, image_shape=(4, 4))
  with pytest.raises(ValueError, match="4-D"):
    model.apply(variables, images.reshape(2, 16))


def test_l2_normalize_matches_numpy_and_has_a_finite_gradient_at_zero():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-8, 0.0]], np.float32)
  norms = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  normalize = jax.jit(lambda v: soft.l2_normalize(v, axis=-1))
  np.testing.assert_allclose(normalize(jnp.asarray(x)), x / norms, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(normalize(v)[:, 0])))(jnp.asarray(x))
  assert np.all(np.isfinite(grad))
  # At the zero row the map is x / eps: d(x_0 / eps)/dx_0 = 1e6.
  np.testing.assert_allclose(grad[1], [1e6, 0.0], rtol=1e-4)
