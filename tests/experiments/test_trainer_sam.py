"""The trainer's SAM step (config.train.sam_rho / sam_rule) against a hand-written reference:
two jax.grad calls of a hand-written loss, the ascent step by hand, the same optax update; rho=0
bit-identical to the plain step; memory value rows left alone; clear build-time errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import optim
from experiments import trainer as trainer_lib
from experiments.configs import base
from sparsejax import masks
from sparsejax.memory import sparse_optim
from tests.experiments import test_trainer

RHO = 0.3
RULE = r"norm|layer_0/ffn/wi"  # the norm scales and one 90 %-sparse kernel


def sparse_sam_config(data_dir, **train):
  """The tiny LM (one block), its kernels 90 % sparse, SAM at RHO on RULE; no warmup: step 0
  moves."""
  c = test_trainer.tiny_config(data_dir, sam_rho=RHO, sam_rule=RULE, warmup_steps=0, **train)
  c.model.num_layers = 1
  c.sparsity.update(enabled=True, density=0.1, rules=((r"/(ffn|attention)/w", "unstructured"),
                                                      (r".", "dense")))
  return c


def reference_step(task, tx, state, batch, rho):
  """(new params, loss at w, the plain step's new params): w = params * mask, g = mask * ∇L(w),
  ε = ρ g_S / ‖g_S‖ on the leaves S of RULE (named by hand), params + tx.update(∇L(w + ε));
  the plain step: params + tx.update(∇L(w))."""
  mask = masks.get_mask(state["opt_state"])
  step_rng = jax.random.fold_in(state["rng"], state["step"])
  rngs = {name: jax.random.fold_in(step_rng, i)
          for i, name in enumerate(trainer_lib.RNG_STREAMS)}

  def loss(w):  # mean next-byte cross-entropy over the weighted targets
    logits, aux = task.model.apply({"params": w}, batch["inputs"], deterministic=False, rngs=rngs)
    assert not jax.tree.leaves(aux["losses"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])

  w = jax.tree.map(lambda p, m: p * m, state["params"], mask.leaves)
  g_dense = jax.grad(loss)(w)
  g = jax.tree.map(lambda x, m: x * m, g_dense, mask.leaves)
  selected = {("layer_0", "attention_norm", "scale"), ("layer_0", "ffn_norm", "scale"),
              ("final_norm", "scale"), ("layer_0", "ffn", "wi")}
  name = lambda path: tuple(k.key for k in path)
  assert {name(p) for p, _ in jax.tree_util.tree_flatten_with_path(w)[0]} >= selected
  norm = jnp.sqrt(sum(jnp.sum(x ** 2) for p, x in jax.tree_util.tree_flatten_with_path(g)[0]
                      if name(p) in selected))
  w_eps = jax.tree_util.tree_map_with_path(
      lambda p, x, gx: x + rho * gx / norm if name(p) in selected else x, w, g)
  step = lambda grads: optax.apply_updates(
      state["params"], tx.update(grads, state["opt_state"], state["params"])[0])
  return step(jax.grad(loss)(w_eps)), loss(w), step(g_dense)


def test_sam_step_matches_reference_and_rho_zero_is_the_plain_step(stdlib_data_dir, tmp_path):
  t = trainer_lib.Trainer(sparse_sam_config(stdlib_data_dir), str(tmp_path), jax.devices()[:1])
  try:
    batch = t._put(next(t.data), t.config.train.batch_size)
    # Compared at step 1: Adam's first step is lr * sign(g) and barely sees SAM.
    state, _ = t.train_step(t.init_state(), batch)
    batch = t._put(next(t.data), t.config.train.batch_size)
    copy = lambda: jax.tree.map(jnp.array, state)  # train_step donates its state
    jaxpr = lambda **sam: str(jax.make_jaxpr(trainer_lib.make_train_step(
        t.task, t.tx, t.schedule, optim.masked_params, **sam))(state, batch))
    plain_jaxpr, zero_jaxpr = jaxpr(), jaxpr(sam_rho=0.0, sam_rule=RULE)
    want_params, want_loss, plain_params = jax.jit(
        lambda s, b: reference_step(t.task, t.tx, s, b, RHO))(copy(), batch)
    sam_state, sam_metrics = t.train_step(copy(), batch)
  finally:
    t.close()
  test_trainer.assert_trees_close(sam_state["params"], want_params, rtol=1e-5)
  np.testing.assert_allclose(sam_metrics["train/loss"], want_loss, rtol=1e-6)
  pruned = ~np.asarray(masks.get_mask(state["opt_state"]).leaves["layer_0"]["ffn"]["wi"])
  assert np.all(np.asarray(sam_state["params"]["layer_0"]["ffn"]["wi"])[pruned] == 0)
  sam_vs_plain = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), want_params,
                              plain_params)
  assert sam_vs_plain["final_norm"]["scale"] > 1e-4  # the test sees SAM change the step
  assert zero_jaxpr == plain_jaxpr  # the same computation: bit-identical results


def test_sam_grads_perturbs_matched_leaves_and_leaves_rows_alone():
  weights = {"norm": jnp.array([1.0, 2.0]), "table": jnp.ones((4, 2)), "w": jnp.ones((2, 2))}
  grads = {"norm": jnp.array([3.0, 4.0]),
           "table": sparse_optim.Rows(jnp.array([1, 4]), jnp.ones((2, 2))),
           "w": jnp.full((2, 2), 7.0)}
  seen = trainer_lib.sam_grads(lambda w: w, weights, grads, 0.5, "norm")
  np.testing.assert_allclose(seen["norm"], [1.0 + 0.5 * 3 / 5, 2.0 + 0.5 * 4 / 5])
  assert seen["table"] is weights["table"]
  np.testing.assert_array_equal(seen["w"], weights["w"])


def _train(**fields):
  c = base.get_config().train
  c.update(fields)
  return c


def test_check_sam_errors():
  params = {"layer_0": {"ffn": {"values": jnp.ones((8, 4)), "subkeys": jnp.ones((2, 4, 2)),
                                "query": jnp.ones((4, 4))},
                        "ffn_norm": {"scale": jnp.ones(4)}}}
  optim.check_sam(_train(sam_rho=0.0, sam_rule="nothing"), params)  # off: the rule is unused
  optim.check_sam(_train(sam_rho=0.1, memory_values="sparse"), params)
  with pytest.raises(ValueError, match=r"sam_rho=-0.1 must be a number >= 0"):
    optim.check_sam(_train(sam_rho=-0.1), params)
  with pytest.raises(ValueError, match=r"sam_rule='\(' is not a regex"):
    optim.check_sam(_train(sam_rho=0.1, sam_rule="("), params)
  with pytest.raises(ValueError, match="memory value tables layer_0/ffn/values, whose gradients "
                                       "are rows under config.train.memory_values='sparse'"):
    optim.check_sam(_train(sam_rho=0.1, sam_rule="ffn", memory_values="sparse"), params)


def test_rule_matching_no_param_fails_at_build(stdlib_data_dir, tmp_path):
  config = test_trainer.tiny_config(stdlib_data_dir, sam_rho=0.1, sam_rule="batchnorm")
  with pytest.raises(trainer_lib.ConfigError, match=r"sam_rule='batchnorm' \(with config.train."
                                                    r"sam_rho=0.1\) matches no param; the params "
                                                    r"are embed/embedding, final_norm/scale"):
    trainer_lib.Trainer(config, str(tmp_path), jax.devices()[:1])
