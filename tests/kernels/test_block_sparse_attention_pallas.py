"""Block-sparse attention's Pallas kernels (TPU and GPU flavours, interpret mode) against dense
masked attention: NumPy float64 outputs, JAX autodiff of the dense attention for gradients.

Interpret mode fills what a kernel never wrote with NaN, which `assert_close` catches (e.g. the
dk / dv of a key block that no query attends). The TPU lowering is smoke-tested with jax.export.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse_attention as bsa
from tests.kernels.checks import assert_close
from tests.kernels.test_block_sparse_attention import inputs, jnp_attention, numpy_attention

SEQ_LEN, BLOCK, SCALE = 37, 8, 0.3  # R = 5 blocks, the last one ragged (5 of 8 positions)


def mixed_mask(seq_len: int, block: int, seed: int = 0) -> np.ndarray:
  """[3, T, T] by explicit loops, one layout per head:

  head 0: causal, random whole blocks below the diagonal (some skipped), plus the diagonal;
  head 1: non-causal, (i + j) % 3 != 0 or i == j, and key block 2 seen by no query;
  head 2: causal sliding window of 5 keys (most blocks empty, partial diagonal blocks).
  """
  kept = np.random.default_rng(seed).random((seq_len, seq_len)) < 0.5
  mask = np.zeros((3, seq_len, seq_len), bool)
  for i in range(seq_len):
    for j in range(seq_len):
      mask[0, i, j] = j <= i and (i // block == j // block or kept[i // block, j // block])
      mask[1, i, j] = ((i + j) % 3 != 0 or i == j) and j // block != 2
      mask[2, i, j] = i - 5 < j <= i
  return mask


@pytest.fixture(scope="module")
def case():
  """The mixed mask, its schedule, inputs, and the dense float64 output and autodiff gradients."""
  mask = mixed_mask(SEQ_LEN, BLOCK)
  q, k, v, cotangent = inputs(2, 3, SEQ_LEN, 8)

  @jax.jit
  def dense_grads(q, k, v):
    return jax.vjp(lambda *a: jnp_attention(*a, mask, SCALE), q, k, v)[1](cotangent)

  return (bsa.schedule_from_mask(mask, BLOCK), (q, k, v, cotangent),
          numpy_attention(q, k, v, mask, SCALE), dense_grads(q, k, v))


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_outputs_and_gradients_match_dense_masked_attention(platform, case):
  """Ragged length, per-head masks, causal and non-causal heads, empty blocks and an empty key
  block column (its dk, dv must be written as zeros), fp32 within 1e-5."""
  schedule, (q, k, v, cotangent), want_out, want_grads = case

  @jax.jit
  def attention_and_grads(q, k, v):
    out, vjp = jax.vjp(lambda *a: bsa.block_sparse_attention(
        *a, schedule, scale=SCALE, implementation="pallas", interpret=True, platform=platform),
                       q, k, v)
    return out, vjp(cotangent)

  out, grads = attention_and_grads(q, k, v)
  assert_close(out, want_out)
  for name, grad, want in zip("qkv", grads, want_grads):
    assert_close(grad, want, f"d{name}")
  assert np.all(np.asarray(grads[1])[:, 1, 2 * BLOCK:3 * BLOCK] == 0)


def test_key_steps_list_each_key_blocks_query_blocks():
  """by_key, against the per-head block mask read column by column."""
  mask = mixed_mask(SEQ_LEN, BLOCK)
  schedule = bsa.schedule_from_mask(mask, BLOCK)
  num_blocks = schedule.num_blocks
  padded = np.pad(mask, [(0, 0), (0, 3), (0, 3)])
  block_HRC = padded.reshape(3, num_blocks, BLOCK, num_blocks, BLOCK).any((2, 4))
  steps, rows_Z, cols_Z = schedule.by_key, schedule.blocks.rows_Z, schedule.blocks.cols_Z
  for head in range(3):
    for col in range(num_blocks):
      key_row = head * num_blocks + col
      s = np.arange(steps.start_O1[key_row], steps.start_O1[key_row + 1])
      live = s[steps.live_S[s] == 1]
      assert len(s) >= 1 and np.all(steps.out_S[s] == key_row)
      assert list(steps.in_S[live]) == list(np.nonzero(block_HRC[head, :, col])[0])
      np.testing.assert_array_equal(rows_Z[steps.block_S[live]],
                                    head * num_blocks + steps.in_S[live])
      np.testing.assert_array_equal(cols_Z[steps.block_S[live]], col)


def test_auto_falls_back_to_xla_where_the_kernel_cannot_tile(case):
  """Block 8 fits neither compiled kernel, so auto on a TPU runs the XLA path (here on CPU)."""
  schedule, (q, k, v, _), want_out, _ = case
  out = jax.jit(lambda q, k, v: bsa.block_sparse_attention(q, k, v, schedule, scale=SCALE,
                                                          platform="tpu"))(q, k, v)
  assert_close(out, want_out)


@pytest.mark.parametrize("kwargs,match", [
    (dict(implementation="pallas"),
     r"implementation='pallas' needs a TPU or GPU, or interpret=True; on 'cpu'"),
    (dict(implementation="pallas", platform="tpu"),
     r"the TPU kernel needs a block that is a multiple of 128, got 8"),
    (dict(implementation="pallas", platform="gpu"),
     r"the GPU kernel needs a block and head dim that are powers of two >= 16, got block 8"),
])
def test_pallas_that_cannot_run_is_a_clear_error(kwargs, match):
  schedule = bsa.schedule_from_mask(np.tril(np.ones((1, 16, 16), bool)), 8)
  q = jnp.zeros((1, 1, 16, 8))
  with pytest.raises(ValueError, match=match):
    bsa.block_sparse_attention(q, q, q, schedule, **kwargs)


def test_a_query_that_sees_no_key_is_an_error_before_any_kernel():
  mask = mixed_mask(SEQ_LEN, BLOCK)
  mask[2, 30] = False
  with pytest.raises(ValueError, match=r"query position 30 of head 2 sees no key"):
    bsa.schedule_from_mask(mask, BLOCK)


EXPORT = {
    "tpu": ("tpu", "tpu_custom_call", []),
    "gpu": ("cuda", "__gpu$xla.gpu.triton",
            [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]),
}


@pytest.mark.parametrize("platform", sorted(EXPORT))
def test_auto_lowers_to_the_pallas_kernels(platform):
  """From a CPU host, auto for the platform lowers forward, dq and dk / dv to three kernels
  (T = 300 ragged, 128 x 128 blocks, K = 64, bf16)."""
  seq_len = 300
  mask = np.tril(np.ones((2, seq_len, seq_len), bool))
  mask[1] &= np.triu(mask[1], -100)
  schedule = bsa.schedule_from_mask(mask, 128)
  export_platform, custom_call, disabled = EXPORT[platform]

  def forward_backward(q, k, v):
    o, vjp = jax.vjp(lambda *a: bsa.block_sparse_attention(*a, schedule, platform=platform),
                     q, k, v)
    return o, *vjp(o)

  x = jax.ShapeDtypeStruct((1, 2, seq_len, 64), jnp.bfloat16)
  exported = jax.export.export(jax.jit(forward_backward), platforms=[export_platform],
                               disabled_checks=disabled)(x, x, x)
  assert exported.mlir_module().count(custom_call) == 3
