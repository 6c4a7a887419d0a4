"""Sample-quality metrics from features and class probabilities, in float64 numpy.

* Precision and recall (Kynkaenniemi et al., 2019): each feature set spans a manifold, the
  union of balls around its points whose radius is the distance to the point's k-th nearest
  neighbour in the same set. Precision is the fraction of generated points inside the real
  manifold (fidelity); recall the fraction of real points inside the generated one
  (coverage).
* Inception Score (Salimans et al., 2016): ``exp(E_x KL(p(y|x) || p(y)))``, averaged over
  splits of the samples, from any classifier's logits.

Distances are computed in row blocks, so memory stays ``O(block x N)`` for any set size.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import scipy.special

PR_NEIGHBOURS = 3  # k of the reference implementation and the usual reported numbers
DISTANCE_BLOCK = 1024  # rows per block of squared distances: 1024 x 50,000 float64 = 400 MB
IS_SPLITS = 10  # the usual protocol: 50,000 samples in 10 splits of 5,000


def _check_features(features, name: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty [N, F] array, got shape {features.shape}")
  return features


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``[n, F], [m, F] -> [n, m]`` squared Euclidean distances (never negative)."""
  d = (np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = PR_NEIGHBOURS,
              block: int = DISTANCE_BLOCK) -> np.ndarray:
  """Distance from each row of ``features [N, F]`` to its k-th nearest other row -> ``[N]``."""
  features = _check_features(features, "features")
  if not 1 <= k < features.shape[0]:
    raise ValueError(f"k = {k} neighbours need 1 <= k < N = {features.shape[0]}")
  radii = np.empty(features.shape[0])
  for start in range(0, features.shape[0], block):
    d = _squared_distances(features[start:start + block], features)
    rows = np.arange(d.shape[0])
    d[rows, start + rows] = -1.0  # the point itself sorts first whatever duplicates exist
    radii[start:start + block] = np.sqrt(np.partition(d, k, axis=1)[:, k])
  return radii


def manifold_coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray,
                      block: int = DISTANCE_BLOCK) -> float:
  """Fraction of ``points [n, F]`` within ``radii [m]`` of some row of ``manifold [m, F]``."""
  points = _check_features(points, "points")
  manifold = _check_features(manifold, "manifold")
  if points.shape[1] != manifold.shape[1] or radii.shape != (manifold.shape[0],):
    raise ValueError(f"points {points.shape}, manifold {manifold.shape} and radii "
                     f"{radii.shape} do not match")
  inside = 0
  for start in range(0, points.shape[0], block):
    d = _squared_distances(points[start:start + block], manifold)
    inside += int(np.sum(np.any(d <= np.square(radii)[None, :], axis=1)))
  return inside / points.shape[0]


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = PR_NEIGHBOURS,
                     block: int = DISTANCE_BLOCK) -> Dict[str, float]:
  """``{"precision", "recall"}`` of ``generated [M, F]`` against ``real [N, F]``."""
  real, generated = _check_features(real, "real"), _check_features(generated, "generated")
  return dict(
      precision=manifold_coverage(generated, real, knn_radii(real, k, block), block),
      recall=manifold_coverage(real, generated, knn_radii(generated, k, block), block))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> Tuple[float, float]:
  """Inception Score of class ``logits [N, K]`` -> (mean, std) over ``splits`` equal splits
  (the last ``N mod splits`` rows are left out, as in the reference implementation)."""
  logits = _check_features(logits, "logits")
  if not 1 <= splits <= logits.shape[0]:
    raise ValueError(f"{splits} splits need 1 <= splits <= N = {logits.shape[0]}")
  log_p = scipy.special.log_softmax(logits, axis=1)
  size = logits.shape[0] // splits
  scores = []
  for part in np.split(log_p[:size * splits], splits):
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_marginal[None, :]), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))
