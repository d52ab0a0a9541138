"""Structures keep exactly their count, the highest scores, in their shape (naive references)."""
import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from sparsejax.masks import structures
from sparsejax.masks.structures import pattern, select, structure_count

_SETTINGS = hypothesis.settings(max_examples=8, deadline=None, database=None)


def _naive_top_k(scores_1d: np.ndarray, k: int) -> np.ndarray:
  """Keep the k highest, ties to the lower index, by a plain Python sort."""
  order = sorted(range(len(scores_1d)), key=lambda i: (-scores_1d[i], i))
  keep = np.zeros(len(scores_1d), bool)
  keep[order[:k]] = True
  return keep


def test_unstructured_hand_worked_with_ties_to_the_lower_index():
  scores = np.array([[3.0, 1.0], [2.0, 2.0]])
  np.testing.assert_array_equal(select("unstructured", scores, 0.5), [[True, False],
                                                                      [True, False]])
  np.testing.assert_array_equal(select("unstructured", np.zeros((2, 3)), 0.5),
                                [[True, True, True], [False, False, False]])


@_SETTINGS
@hypothesis.given(rows=st.sampled_from([1, 3, 8]), cols=st.sampled_from([1, 5]),
                  density=st.floats(0.01, 1.0), seed=st.integers(0, 99))
def test_unstructured_keeps_round_density_size_of_the_best(rows, cols, density, seed):
  scores = np.random.default_rng(seed).integers(0, 5, (rows, cols)).astype(np.float32)
  keep = np.asarray(select("unstructured", scores, density))
  k = round(density * rows * cols)
  assert keep.sum() == k == structure_count("unstructured", (rows, cols), density)
  np.testing.assert_array_equal(keep.reshape(-1), _naive_top_k(scores.reshape(-1), k))


@_SETTINGS
@hypothesis.given(groups=st.sampled_from([1, 3]), outputs=st.sampled_from([1, 4]),
                  nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (4, 4)]),
                  lead=st.integers(1, 2), seed=st.integers(0, 99))
def test_nm_every_group_of_m_holds_exactly_n_of_the_best(groups, outputs, nm, lead, seed):
  n, m = nm
  shape = (lead, groups * m, outputs)
  scores = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  keep = np.asarray(select("nm", scores, None, n=n, m=m))
  assert keep.sum() == structure_count("nm", shape, n / m, n=n, m=m)
  assert keep.sum() == lead * groups * n * outputs
  for e in range(lead):
    for g in range(groups):
      for o in range(outputs):
        group = slice(g * m, (g + 1) * m)
        np.testing.assert_array_equal(keep[e, group, o], _naive_top_k(scores[e, group, o], n))


@_SETTINGS
@hypothesis.given(inputs=st.sampled_from([1, 7, 12]), outputs=st.sampled_from([1, 3]),
                  density=st.floats(0.05, 1.0), seed=st.integers(0, 99))
def test_fan_in_each_output_keeps_exactly_round_density_fan_in(inputs, outputs, density, seed):
  scores = np.random.default_rng(seed).normal(size=(2, inputs, outputs)).astype(np.float32)
  keep = np.asarray(select("fan_in", scores, density))
  k = round(density * inputs)
  np.testing.assert_array_equal(keep.sum(axis=1), np.full((2, outputs), k))
  assert keep.sum() == structure_count("fan_in", scores.shape, density)
  for e in range(2):
    for o in range(outputs):
      np.testing.assert_array_equal(keep[e, :, o], _naive_top_k(scores[e, :, o], k))


def test_block_keeps_whole_blocks_with_the_largest_sums():
  scores = np.zeros((4, 6))
  scores[0:2, 2:4] = 5.0   # block (0, 1): sum 20
  scores[2:4, 4:6] = 1.0   # block (1, 2): sum 4
  scores[2, 0] = 3.0       # block (1, 0): sum 3
  keep = np.asarray(select("block", scores, 2 / 6, block=(2, 2)))
  expected = np.zeros((4, 6), bool)
  expected[0:2, 2:4] = expected[2:4, 4:6] = True
  np.testing.assert_array_equal(keep, expected)
  assert structure_count("block", (4, 6), 2 / 6, block=2) == 8
  assert structure_count("block:block=2x2", (4, 6), 0.5) == 12


def test_channel_keeps_whole_output_channels():
  scores = np.array([[1.0, 9.0, 0.0], [1.0, -9.0, 4.0]])  # channel sums 2, 0, 4
  np.testing.assert_array_equal(select("channel", scores, 2 / 3),
                                [[True, False, True], [True, False, True]])
  np.testing.assert_array_equal(select("channel", scores, 0.5, axis=0),
                                [[True, True, True], [False, False, False]])  # row sums 10, -4
  assert structure_count("channel", (5, 2, 3), 2 / 3) == 20


def test_traced_density_under_jit_matches_concrete():
  scores = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  for name in ("unstructured", "fan_in", "channel", "block:block=2x5"):
    traced = jax.jit(lambda s, d, name=name: select(name, s, d))(scores, 0.5)
    np.testing.assert_array_equal(traced, select(name, scores, 0.5))


def test_butterfly_pattern_hand_worked():
  expected = np.array([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], bool)
  np.testing.assert_array_equal(pattern("butterfly", (4, 4)), expected)  # all levels
  np.testing.assert_array_equal(pattern("butterfly", (4, 4), levels=1),
                                [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
  blocks = pattern("butterfly", (4, 8), block=2, levels=1)  # grid 2x4 stretched from 2x2
  np.testing.assert_array_equal(blocks, np.ones((4, 8), bool))
  assert pattern("butterfly", (8, 8), 3 / 8).sum() == 24 == structure_count("butterfly", (8, 8),
                                                                             3 / 8)
  np.testing.assert_array_equal(select("butterfly", np.zeros((4, 4)), None), expected)


def test_monarch_pattern_hand_worked():
  # 2 blocks: block-diagonal (i // 2 == j // 2) or stride (i % 2 == j % 2).
  expected = np.array([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], bool)
  np.testing.assert_array_equal(pattern("monarch", (4, 4), nblocks=2), expected)
  assert structure_count("monarch", (4, 4), nblocks=2) == 12
  assert pattern("monarch", (16, 16), 0.25).sum() == structure_count("monarch", (16, 16), 0.25)


def test_structure_names_round_trip():
  name = structures.structure_name("block", block=(4, 8))
  assert name == "block:block=4x8"
  assert structures.parse_structure(name) == ("block", {"block": (4, 8)})
  assert structures.parse_structure({"structure": "nm", "n": 2, "m": 4}) == (
      "nm", {"n": 2, "m": 4})
  assert structures.parse_structure("nm:m=4,n=2") == ("nm", {"m": 4, "n": 2})


@pytest.mark.parametrize("call, match", [
    (lambda: select("nm", np.ones((4, 2)), None, n=3, m=2), "N=3, M=2"),
    (lambda: select("unstructured", np.ones((4, 2)), 1.5), "density must be in"),
    (lambda: select("unstructured", np.ones((4, 2)), 0.0), "density must be in"),
    (lambda: select("fan_in", np.ones((4, 2)), None), "needs a density"),
    (lambda: select("nm", np.ones((4, 2)), 0.3, n=2, m=4), "density 0.5"),
    (lambda: select("nm", np.ones((6, 2)), None, n=2, m=4), "multiple of M"),
    (lambda: select("block", np.ones((4, 3)), 0.5, block=2), "must tile"),
    (lambda: select("hexagonal", np.ones((4, 2)), 0.5), "unknown mask structure 'hexagonal'"),
    (lambda: select("fan_in", np.ones(4), 0.5), ">= 2 axes"),
    (lambda: pattern("unstructured", (4, 4), 0.5), "not a fixed pattern"),
    (lambda: pattern("butterfly", (6, 6)), "power of two"),
])
def test_bad_input_errors_name_the_value(call, match):
  with pytest.raises(ValueError, match=match):
    call()
