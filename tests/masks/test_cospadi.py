"""CoSpaDi: planted recovery, OMP against brute force and a NumPy OMP, monotone error, budgets."""
import itertools

import numpy as np
import pytest

from sparsejax.masks import cospadi


def _planted(seed, inputs=24, atoms=6, outputs=256, sparsity=2):
  rng = np.random.default_rng(seed)
  d0_IM = rng.normal(size=(inputs, atoms))
  d0_IM /= np.linalg.norm(d0_IM, axis=0)
  s0_MO = np.zeros((atoms, outputs))
  for o in range(outputs):
    support = rng.choice(atoms, sparsity, replace=False)
    s0_MO[support, o] = rng.normal(size=sparsity) + np.sign(rng.normal(size=sparsity))
  return (d0_IM @ s0_MO).astype(np.float32)


def _numpy_omp(d_IM, y_I, sparsity):
  """Textbook OMP on one column, in float64."""
  d_IM, y_I = np.asarray(d_IM, np.float64), np.asarray(y_I, np.float64)
  support, r_I = [], y_I.copy()
  for _ in range(sparsity):
    corr_M = np.abs(d_IM.T @ r_I) / np.linalg.norm(d_IM, axis=0)
    corr_M[support] = -1
    support.append(int(np.argmax(corr_M)))
    coef, *_ = np.linalg.lstsq(d_IM[:, support], y_I, rcond=None)
    r_I = y_I - d_IM[:, support] @ coef
  s_M = np.zeros(d_IM.shape[1])
  s_M[support] = coef
  return s_M


@pytest.mark.parametrize("seed", [0, 3])
def test_planted_dictionary_is_recovered_through_the_calibration_whitening(seed):
  w_IO = _planted(seed)
  x_NI = np.random.default_rng(seed + 10).normal(size=(64, 24)).astype(np.float32)
  d_IM, s_MO = cospadi.cospadi_compress(w_IO, x_NI, num_atoms=6, sparsity=2, iters=50)
  d_IM, s_MO = np.asarray(d_IM), np.asarray(s_MO)
  assert d_IM.shape == (24, 6) and s_MO.shape == (6, 256)
  assert (np.count_nonzero(s_MO, axis=0) <= 2).all()
  rel = np.linalg.norm(x_NI @ (w_IO - d_IM @ s_MO)) / np.linalg.norm(x_NI @ w_IO)
  assert rel < 1e-3


def test_omp_finds_the_brute_force_optimum_of_an_exactly_sparse_column():
  rng = np.random.default_rng(1)
  d_IM = rng.normal(size=(8, 6)).astype(np.float32)
  y_IO = np.zeros((8, 3), np.float32)
  for o, support in enumerate([(0, 4), (2, 3), (1, 5)]):
    y_IO[:, o] = d_IM[:, list(support)] @ np.array([1.5, -2.0])
  got_MO = np.asarray(cospadi.omp(d_IM, y_IO, 2))
  for o in range(3):
    best = min(itertools.combinations(range(6), 2), key=lambda sup: np.linalg.norm(
        y_IO[:, o] - d_IM[:, sup] @ np.linalg.lstsq(d_IM[:, sup], y_IO[:, o], rcond=None)[0]))
    assert set(np.flatnonzero(np.abs(got_MO[:, o]) > 1e-4)) == set(best)
  np.testing.assert_allclose(d_IM @ got_MO, y_IO, atol=1e-4)


def test_omp_matches_a_numpy_omp_on_random_columns():
  rng = np.random.default_rng(2)
  d_IM = rng.normal(size=(10, 7)).astype(np.float32)
  y_IO = rng.normal(size=(10, 5)).astype(np.float32)
  got_MO = np.asarray(cospadi.omp(d_IM, y_IO, 3))
  want_MO = np.stack([_numpy_omp(d_IM, y_IO[:, o], 3) for o in range(5)], axis=1)
  np.testing.assert_allclose(got_MO, want_MO, atol=1e-4)


def test_whitened_error_never_increases_and_codes_stay_sparse():
  y_IO = np.random.default_rng(4).normal(size=(12, 40)).astype(np.float32)
  d_IM, s_MO, err_T = cospadi.learn_dictionary(y_IO, num_atoms=8, sparsity=3, iters=12)
  err_T = np.asarray(err_T)
  assert (np.diff(err_T) <= 1e-5 * err_T[0]).all() and err_T[-1] < err_T[0]
  assert (np.count_nonzero(np.asarray(s_MO), axis=0) <= 3).all()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y_IO - np.asarray(d_IM) @ s_MO)),
                             err_T[-1], rtol=1e-4)


def test_parameter_budget_helpers():
  assert cospadi.cospadi_param_count(128, 512, 64, 16) == 128 * 64 + 512 * 16
  atoms = cospadi.cospadi_atoms_for_budget(128, 512, 16384, 16)
  assert atoms == 64 and cospadi.cospadi_param_count(128, 512, atoms + 1, 16) > 16384
  with pytest.raises(ValueError, match="atoms"):
    cospadi.cospadi_atoms_for_budget(128, 512, 512 * 16, 16)


def test_bad_sizes_raise():
  w_IO, x_NI = np.zeros((4, 3), np.float32), np.zeros((5, 4), np.float32)
  with pytest.raises(ValueError, match="sparsity=5"):
    cospadi.cospadi_compress(w_IO, x_NI, num_atoms=4, sparsity=5)
  with pytest.raises(ValueError, match="iters=0"):
    cospadi.cospadi_compress(w_IO, x_NI, num_atoms=4, sparsity=2, iters=0)
  with pytest.raises(ValueError, match="calibration"):
    cospadi.cospadi_compress(w_IO, x_NI[:, :3], num_atoms=4, sparsity=2)
