"""Distances between a reference and a generated utterance: no model, no download.

* :func:`mel_cepstral_distortion` (MCD, dB) between two utterances' log-mels, optionally
  aligned by dynamic time warping (:func:`dtw_path`);
* :func:`duration_ratio` of a generated clip to its reference.

Log-mels are those of :func:`resgen_jax.audio.frontend.log_mel`: natural logs of mel
*magnitudes*, one utterance ``[F, n_mels]`` at a time.

MCD scale: the mel cepstrum is that of SPTK-style MCD, ``log|X(w)| = c_0 + 2 sum_k c_k
cos(k w)`` over the mel-warped frequency axis (the log-mel bins sampled at ``w_n = pi (n +
1/2) / n_mels``), so values are on the customary scale (a few dB between versions of the
same speech). They still differ from SPTK's own numbers (its mel-cepstra come from an
all-pass-warped spectral envelope, not a mel filterbank), so compare runs with the same
front end, ``n_mels`` and ``num_coeffs``. Every frame counts, silences included.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import scipy.fft
import scipy.spatial.distance

# The customary 13 cepstral coefficients c_1..c_13 (as in MFCC front ends and most MCD
# reports): the spectral envelope without the pitch harmonics of higher quefrencies.
NUM_CEPSTRAL_COEFFS = 13
# dB of power per natural-log unit of magnitude: 10 log10(|X|^2) = (20 / ln 10) ln|X|, and
# MCD's (10 / ln 10) sqrt(2 sum_k dc_k^2) is that factor applied to sqrt(sum_k dc_k^2 / 2).
MCD_DB = 10.0 / math.log(10.0)
ALIGNMENTS = ("dtw", "none")


def _check_log_mels(log_mels, name: str) -> np.ndarray:
  """-> ``log_mels`` as float64 ``[F >= 1, n_mels]``, or a ValueError naming them."""
  log_mels = np.asarray(log_mels, np.float64)
  if log_mels.ndim != 2:
    raise ValueError(f"{name} must be one utterance's log-mels [F, n_mels], got shape "
                     f"{log_mels.shape}")
  if log_mels.shape[0] == 0 or log_mels.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {log_mels.shape}")
  if not np.all(np.isfinite(log_mels)):
    raise ValueError(f"{name} holds non-finite values")
  return log_mels


def mel_cepstrum(log_mels, num_coeffs: int = NUM_CEPSTRAL_COEFFS) -> np.ndarray:
  """Mel cepstra of log-mel frames: float ``[F, n_mels]`` -> float64 ``[F, num_coeffs]``.

  The cepstrum of each frame along the mel axis, ``c_k = (1 / n_mels) sum_n x_n cos(pi k
  (2n + 1) / (2 n_mels))`` (a DCT-II scaled so that ``x = c_0 + 2 sum_k c_k cos``: see the
  module docstring), keeping ``c_1 .. c_num_coeffs``: ``c_0``, the frame's mean log level
  (energy), is dropped.

  Raises a ValueError unless ``1 <= num_coeffs < n_mels``.
  """
  log_mels = _check_log_mels(log_mels, "log_mels")
  n_mels = log_mels.shape[1]
  if (not isinstance(num_coeffs, (int, np.integer)) or isinstance(num_coeffs, bool)
      or not 1 <= num_coeffs < n_mels):
    raise ValueError(f"num_coeffs must be an integer in [1, n_mels = {n_mels}), got "
                     f"{num_coeffs!r}")
  # scipy's unnormalised DCT-II is 2 sum_n x_n cos(...).
  return scipy.fft.dct(log_mels, type=2, axis=-1)[:, 1:num_coeffs + 1] / (2.0 * n_mels)


def accumulated_cost(cost) -> np.ndarray:
  """DTW's accumulated cost ``D [N, M]`` (float64) of a cost matrix ``[N, M]``:
  ``D[i, j] = cost[i, j] + min(D[i - 1, j], D[i, j - 1], D[i - 1, j - 1])``, ``D[0, 0] =
  cost[0, 0]``: the least total cost of a path from (0, 0) to (i, j).

  A row at a time: with ``a_j = cost[i, j] + min(D[i - 1, j], D[i - 1, j - 1])`` and row
  prefix sums ``P_j``, the horizontal recurrence unrolls to ``D[i, j] = P_j + min_{l <= j}
  (a_l - P_l)``, a cumulative minimum.
  """
  cost = np.asarray(cost, np.float64)
  if cost.ndim != 2 or 0 in cost.shape:
    raise ValueError(f"DTW cost must be a non-empty matrix [N, M], got shape {cost.shape}")
  if not np.all(np.isfinite(cost)):
    raise ValueError("DTW cost holds non-finite values")
  total = np.empty_like(cost)
  total[0] = np.cumsum(cost[0])
  for i in range(1, cost.shape[0]):
    above = total[i - 1]
    entry = cost[i] + np.minimum(above, np.concatenate([[np.inf], above[:-1]]))
    prefix = np.cumsum(cost[i])
    total[i] = prefix + np.minimum.accumulate(entry - prefix)
  return total


def dtw_path(cost) -> Tuple[np.ndarray, np.ndarray]:
  """The least-cost warping path through a cost matrix: float ``[N, M]`` -> (``i [P]``,
  ``j [P]``), int64.

  The path runs from (0, 0) to (N - 1, M - 1) in steps (1, 0), (0, 1) and (1, 1) and
  minimises ``sum_p cost[i[p], j[p]]`` (classic DTW, no slope constraint or window); of
  equal-cost predecessors, backtracking prefers the diagonal, then (i - 1, j).
  ``max(N, M) <= P <= N + M - 1``.
  """
  total = accumulated_cost(cost)
  i, j = total.shape[0] - 1, total.shape[1] - 1
  path = [(i, j)]
  while i > 0 or j > 0:
    if i == 0:
      j -= 1
    elif j == 0:
      i -= 1
    else:
      step = int(np.argmin((total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])))
      i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    path.append((i, j))
  rows, cols = np.asarray(path[::-1], np.int64).T
  return rows, cols


def mel_cepstral_distortion(ref_log_mels, gen_log_mels,
                            num_coeffs: int = NUM_CEPSTRAL_COEFFS,
                            align: str = "dtw") -> float:
  """Mel cepstral distortion in dB between two utterances' log-mels ``[F_ref, n_mels]`` and
  ``[F_gen, n_mels]``.

  Per aligned frame pair, ``(10 / ln 10) sqrt(2 sum_{k=1}^{K} (c_k - c'_k)^2)`` over the
  :func:`mel_cepstrum` coefficients, averaged over the pairs. ``align="dtw"`` pairs frames
  along the :func:`dtw_path` of the Euclidean cepstral distances (for equal lengths never
  above ``"none"``: its diagonal is one of the paths, and the DTW path is at least as
  long); ``align="none"`` pairs frame f with frame f for f below the shorter length.
  Symmetric in its arguments; 0 for identical inputs. See the module docstring for the
  scale.

  Raises a ValueError for inputs that are not ``[F >= 1, n_mels]``, differ in ``n_mels``, or
  an unknown ``align``.
  """
  ref = _check_log_mels(ref_log_mels, "ref_log_mels")
  gen = _check_log_mels(gen_log_mels, "gen_log_mels")
  if ref.shape[1] != gen.shape[1]:
    raise ValueError(f"ref_log_mels have {ref.shape[1]} mel bins, gen_log_mels "
                     f"{gen.shape[1]}")
  if align not in ALIGNMENTS:
    raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
  ref_cep, gen_cep = mel_cepstrum(ref, num_coeffs), mel_cepstrum(gen, num_coeffs)
  if align == "none":
    count = min(ref_cep.shape[0], gen_cep.shape[0])
    distances = np.linalg.norm(ref_cep[:count] - gen_cep[:count], axis=-1)
  else:
    # Pair by pair, sqrt(sum (a - b)^2): no [F_ref, F_gen, K] temporary, and exactly 0 for
    # equal frames (unlike the |a|^2 + |b|^2 - 2 a.b expansion).
    cost = scipy.spatial.distance.cdist(ref_cep, gen_cep, "euclidean")
    rows, cols = dtw_path(cost)
    distances = cost[rows, cols]
  return float(MCD_DB * math.sqrt(2.0) * np.mean(distances))


def _num_samples(clip, name: str) -> int:
  """A sample count, or a mono wave ``[T]``'s length -> an int >= 0, or a ValueError."""
  array = np.asarray(clip)
  if array.ndim == 1:
    return array.shape[0]
  if array.ndim == 0 and np.issubdtype(array.dtype, np.integer) and array >= 0:
    return int(array)
  raise ValueError(f"{name} must be a sample count (an int >= 0) or a mono wave [T], got "
                   f"{array.dtype} {array.shape}" + (f" {array!r}" if array.ndim == 0 else ""))


def duration_ratio(gen_samples, ref_samples) -> float:
  """Duration of a generated clip over its reference's (same sample rate): 1 is ideal.

  Args:
    gen_samples, ref_samples: each a sample count (an int) or a mono wave ``[T]``.
  Raises:
    ValueError: for other inputs or an empty reference.
  """
  gen, ref = _num_samples(gen_samples, "gen_samples"), _num_samples(ref_samples, "ref_samples")
  if ref == 0:
    raise ValueError("duration_ratio: the reference has 0 samples")
  return gen / ref
