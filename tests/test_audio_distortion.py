"""The distances between utterances against slow explicit references: mel cepstrum, DTW,
MCD, and the duration ratio."""

import math
import time

import numpy as np
import pytest

from resgen_jax.audio import distortion

# --------------------------------------------------------------------------------------
# Slow references


def slow_cepstrum(frame) -> np.ndarray:
  """The cepstrum of one log-spectrum frame ``[N]`` sampled at ``w_n = pi (n + 1/2) / N``,
  term by term: ``c_k = (1 / N) sum_n x_n cos(k w_n)``, so ``x(w) = c_0 + 2 sum_k c_k
  cos(k w)`` (SPTK's convention)."""
  n = len(frame)
  return np.array([sum(frame[i] * math.cos(k * math.pi * (i + 0.5) / n) for i in range(n)) / n
                   for k in range(n)])


def all_paths(n: int, m: int):
  """Every monotone path from (0, 0) to (n - 1, m - 1) in steps (1, 0), (0, 1), (1, 1)."""
  if n == 1 and m == 1:
    yield [(0, 0)]
    return
  for di, dj in ((1, 0), (0, 1), (1, 1)):
    if n - di >= 1 and m - dj >= 1:
      for path in all_paths(n - di, m - dj):
        yield path + [(n - 1, m - 1)]


def slow_dtw(cost) -> list:
  """Textbook DTW: the accumulated cost cell by cell, then backtracking."""
  n, m = cost.shape
  total = np.full((n + 1, m + 1), np.inf)
  total[0, 0] = 0.0
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j], total[i, j - 1],
                                             total[i - 1, j - 1])
  i, j, path = n, m, []
  while (i, j) != (0, 0):
    path.append((i - 1, j - 1))
    moves = [(total[i - 1, j - 1], i - 1, j - 1), (total[i - 1, j], i - 1, j),
             (total[i, j - 1], i, j - 1)]
    _, i, j = min(moves, key=lambda move: move[0])
    if (i == 0) != (j == 0):  # the border row/column of infinities is not a real cell
      raise AssertionError("backtracking left the grid")
  return path[::-1]


def slow_mcd(ref, gen, num_coeffs: int, align: str) -> float:
  ref_cep = np.array([slow_cepstrum(frame)[1:num_coeffs + 1] for frame in ref])
  gen_cep = np.array([slow_cepstrum(frame)[1:num_coeffs + 1] for frame in gen])
  if align == "none":
    pairs = [(f, f) for f in range(min(len(ref), len(gen)))]
  else:
    cost = np.array([[math.sqrt(sum((a - b) ** 2 for a, b in zip(r, g))) for g in gen_cep]
                     for r in ref_cep])
    pairs = slow_dtw(cost)
  per_frame = [10.0 / math.log(10.0) * math.sqrt(2.0 * sum(
      (ref_cep[i][k] - gen_cep[j][k]) ** 2 for k in range(num_coeffs))) for i, j in pairs]
  return sum(per_frame) / len(per_frame)


def check_path(rows, cols, n: int, m: int) -> None:
  assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (n - 1, m - 1)
  steps = set(zip(np.diff(rows).tolist(), np.diff(cols).tolist()))
  assert steps <= {(1, 0), (0, 1), (1, 1)}, steps


# --------------------------------------------------------------------------------------
# Mel cepstrum, DTW, MCD


def test_mel_cepstrum_matches_explicit_sum():
  log_mels = np.random.default_rng(0).normal(size=(6, 11)) * 3.0
  expected = np.array([slow_cepstrum(frame)[1:6] for frame in log_mels])
  cepstrum = distortion.mel_cepstrum(log_mels, 5)
  assert cepstrum.shape == (6, 5) and cepstrum.dtype == np.float64
  np.testing.assert_allclose(cepstrum, expected, rtol=1e-10, atol=1e-12)
  for bad in (0, 11, 2.0):
    with pytest.raises(ValueError, match="num_coeffs"):
      distortion.mel_cepstrum(log_mels, bad)
  with pytest.raises(ValueError, match=r"\[F, n_mels\]"):
    distortion.mel_cepstrum(log_mels[0], 5)


def test_dtw_path_matches_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(40):
    n, m = rng.integers(1, 7, size=2)
    cost = rng.random((n, m))
    if trial % 2:
      cost = rng.integers(0, 3, size=(n, m)).astype(float)  # many equal-cost paths
    best = min(sum(cost[i, j] for i, j in path) for path in all_paths(n, m))
    rows, cols = distortion.dtw_path(cost)
    check_path(rows, cols, n, m)
    assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)
    assert distortion.accumulated_cost(cost)[-1, -1] == pytest.approx(best, abs=1e-12)


def test_dtw_path_matches_textbook_dtw_and_is_fast():
  cost = np.random.default_rng(1).random((40, 55))
  rows, cols = distortion.dtw_path(cost)
  assert list(zip(rows.tolist(), cols.tolist())) == slow_dtw(cost)
  large = np.random.default_rng(2).random((500, 500))
  start = time.perf_counter()
  rows, cols = distortion.dtw_path(large)
  assert time.perf_counter() - start < 1.0
  check_path(rows, cols, 500, 500)
  for bad in (np.zeros((0, 3)), np.zeros(3), np.array([[0.0, np.nan]])):
    with pytest.raises(ValueError, match="DTW cost"):
      distortion.dtw_path(bad)


@pytest.mark.parametrize("align", ["dtw", "none"])
def test_mcd_matches_slow_reference(align):
  rng = np.random.default_rng(3)
  ref, gen = rng.normal(size=(9, 16)), rng.normal(size=(12, 16))
  expected = slow_mcd(ref, gen, 6, align)
  assert distortion.mel_cepstral_distortion(ref, gen, 6, align) == pytest.approx(expected,
                                                                              rel=1e-10)
  default = slow_mcd(ref, gen, distortion.NUM_CEPSTRAL_COEFFS, align)
  assert distortion.mel_cepstral_distortion(ref, gen, align=align) == pytest.approx(default,
                                                                                 rel=1e-10)


def test_mcd_hand_values():
  rng = np.random.default_rng(4)
  ref = rng.normal(size=(10, 20))
  # Adding 2 delta cos(w_n) to every frame moves c_1 by delta: MCD = (10 / ln 10) sqrt(2)
  # delta. A constant added to every bin moves only c_0: MCD 0.
  basis = 2.0 * np.cos(math.pi * (2 * np.arange(20) + 1) / 40)
  for align in distortion.ALIGNMENTS:
    assert distortion.mel_cepstral_distortion(ref, ref + 0.5 * basis, align=align) == (
        pytest.approx(10.0 / math.log(10.0) * math.sqrt(2.0) * 0.5, rel=1e-9))
    assert distortion.mel_cepstral_distortion(ref, ref + 3.0, align=align) == pytest.approx(
        0.0, abs=1e-9)
  # c_14 is beyond the 13 coefficients kept.
  beyond = np.cos(math.pi * 14 * (2 * np.arange(20) + 1) / 40)
  assert distortion.mel_cepstral_distortion(ref, ref + beyond, align="none") == pytest.approx(
      0.0, abs=1e-9)


def test_mcd_properties():
  rng = np.random.default_rng(5)
  ref, other = rng.normal(size=(30, 20)), rng.normal(size=(25, 20))
  for align in distortion.ALIGNMENTS:
    assert distortion.mel_cepstral_distortion(ref, ref, align=align) == 0.0
    forward = distortion.mel_cepstral_distortion(ref, other, align=align)
    assert forward > 0.0
    assert distortion.mel_cepstral_distortion(other, ref, align=align) == pytest.approx(
        forward, rel=1e-12)
  same_length = rng.normal(size=(30, 20))
  assert (distortion.mel_cepstral_distortion(ref, same_length, align="dtw")
          <= distortion.mel_cepstral_distortion(ref, same_length, align="none"))
  # A slowed-down copy (every frame twice) with a little noise: DTW undoes the stretch.
  stretched = np.repeat(ref, 2, axis=0) + 0.01 * rng.normal(size=(60, 20))
  warped = distortion.mel_cepstral_distortion(ref, stretched, align="dtw")
  unaligned = distortion.mel_cepstral_distortion(ref, stretched, align="none")
  assert warped < 0.1 * unaligned
  assert distortion.mel_cepstral_distortion(ref, np.repeat(ref, 3, axis=0)) == 0.0


def test_mcd_errors():
  ref = np.zeros((5, 20))
  with pytest.raises(ValueError, match="20 mel bins, gen_log_mels 16"):
    distortion.mel_cepstral_distortion(ref, np.zeros((5, 16)))
  with pytest.raises(ValueError, match="gen_log_mels is empty"):
    distortion.mel_cepstral_distortion(ref, np.zeros((0, 20)))
  with pytest.raises(ValueError, match=r"ref_log_mels must be .*\[F, n_mels\]"):
    distortion.mel_cepstral_distortion(np.zeros((1, 5, 20)), ref)
  with pytest.raises(ValueError, match="non-finite"):
    distortion.mel_cepstral_distortion(ref, np.full((5, 20), np.inf))
  with pytest.raises(ValueError, match="align"):
    distortion.mel_cepstral_distortion(ref, ref, align="linear")


def test_duration_ratio():
  assert distortion.duration_ratio(24000, 16000) == 1.5
  assert distortion.duration_ratio(np.zeros(100), np.zeros(400)) == 0.25
  assert distortion.duration_ratio(np.int64(0), 10) == 0.0
  with pytest.raises(ValueError, match="0 samples"):
    distortion.duration_ratio(10, np.zeros(0))
  with pytest.raises(ValueError, match="gen_samples"):
    distortion.duration_ratio(np.zeros((2, 10)), 10)
  with pytest.raises(ValueError, match="ref_samples"):
    distortion.duration_ratio(10, -3)
  with pytest.raises(ValueError, match="ref_samples"):
    distortion.duration_ratio(10, 2.5)
