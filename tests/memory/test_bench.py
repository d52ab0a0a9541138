"""The memory benchmark's measured functions compute what they claim: the same read and grads."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import memory as bench_memory
from sparsejax.memory import pkm
from tests.memory.test_pkm import random_case


def test_pkm_naive_and_dense_grad_cases_agree():
  query, keys, values = random_case(0, batch=6, heads=1, num_keys=8, half=4, d_value=5)
  dout = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32)
  k = 4
  args = (query, keys, values, dout)
  pkm_out = jax.jit(functools.partial(bench_memory.sparse_read_fwd_bwd, pkm.pkm_lookup, k))(*args)
  naive_out = jax.jit(
      functools.partial(bench_memory.sparse_read_fwd_bwd, bench_memory.naive_lookup, k)
  )(*args)
  dquery, dkeys, dvalues = jax.jit(functools.partial(bench_memory.dense_grad_fwd_bwd, k))(*args)
  out, pkm_dquery, pkm_dkeys, idx, drows = pkm_out
  np.testing.assert_allclose(out, pkm.pkm_read(query, keys, values, k)[0], rtol=1e-6)
  np.testing.assert_allclose(naive_out[0], out, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.sort(naive_out[3], -1), np.sort(idx, -1))
  for got, want in ((pkm_dquery, dquery), (pkm_dkeys, dkeys), (naive_out[1], dquery),
                    (naive_out[2], dkeys)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The sparse row gradients, scattered into the table, are the dense value gradient.
  scattered = jnp.zeros_like(values).at[idx.reshape(-1)].add(drows.reshape(-1, 5))
  np.testing.assert_allclose(scattered, dvalues, rtol=1e-5, atol=1e-6)


def test_ratios_compare_methods_within_the_run():
  rows = [{"case": "pkm_N4", "median_s": 1.0}, {"case": "naive_N4", "median_s": 3.0},
          {"case": "pkm_N16", "median_s": 2.0}, {"case": "naive_N16", "median_s": 12.0}]
  bench_memory._add_ratios(rows)  # pylint: disable=protected-access
  assert [r["vs_smallest_N"] for r in rows] == [1.0, 1.0, 2.0, 4.0]
  assert rows[0]["naive_over_pkm"] == 3.0 and rows[2]["naive_over_pkm"] == 6.0
  assert "naive_over_pkm" not in rows[1]
