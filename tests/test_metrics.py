"""Precision/recall and Inception Score against constructed answers and slow references."""

import numpy as np
import pytest

from resgen_jax.evaluation import metrics


def slow_radii(x, k):
  d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
  np.fill_diagonal(d, np.inf)
  return np.sort(d, axis=1)[:, k - 1]


def slow_coverage(points, manifold, radii):
  d = np.sqrt(((points[:, None, :] - manifold[None, :, :]) ** 2).sum(-1))
  return float(np.mean((d <= radii[None, :]).any(axis=1)))


def test_radii_and_coverage_match_a_brute_force_reference_in_any_block_size():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(57, 5)), rng.normal(size=(43, 5)) + 0.5
  for k in (1, 3, 5):
    np.testing.assert_allclose(metrics.knn_radii(x, k, block=8), slow_radii(x, k), rtol=1e-9)
  radii = metrics.knn_radii(x, 3, block=1000)
  assert metrics.manifold_coverage(y, x, radii, block=7) == pytest.approx(
      slow_coverage(y, x, radii))


def test_precision_and_recall_on_point_sets_with_known_answers():
  # Real: 10 points on a line, 1 apart: each point's 3rd neighbour is 2 away (ends: 3).
  real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
  np.testing.assert_allclose(metrics.knn_radii(real, 3), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
  assert metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
  # Half the generated points lie on the real line, half 10 units away from it.
  near = np.stack([np.linspace(0, 9, 6), np.full(6, 0.5)], axis=1)
  far = np.stack([np.linspace(0, 9, 6), np.full(6, 10.0)], axis=1)
  generated = np.concatenate([near, far])
  result = metrics.precision_recall(real, generated)
  assert result["precision"] == 0.5
  # Recall: the balls around `near` (3rd-neighbour radii within the generated set, 3.6 or
  # more) cover every real point.
  assert result["recall"] == 1.0
  # A generated set collapsed onto one real point covers only the real points near it.
  collapsed = np.zeros((8, 2)) + np.array([4.0, 0.0]) + np.random.default_rng(1).normal(
      scale=1e-3, size=(8, 2))
  result = metrics.precision_recall(real, collapsed)
  assert result["precision"] == 1.0 and result["recall"] == 0.1


def test_inception_score_known_values_and_reference():
  classes = 5
  confident = np.full((100, classes), -50.0)
  confident[np.arange(100), np.arange(100) % classes] = 50.0  # sure and evenly spread
  mean, std = metrics.inception_score(confident, splits=4)
  assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
  assert metrics.inception_score(np.zeros((40, classes)), splits=2)[0] == pytest.approx(1.0)
  logits = np.random.default_rng(0).normal(size=(103, 7)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  reference = []
  for part in np.split(p[:100], 10):
    marginal = part.mean(0)
    reference.append(np.exp(np.mean(np.sum(part * np.log(part / marginal), axis=1))))
  mean, std = metrics.inception_score(logits, splits=10)
  assert mean == pytest.approx(np.mean(reference), rel=1e-9)
  assert std == pytest.approx(np.std(reference), rel=1e-9)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="need 1 <= k < N"):
    metrics.knn_radii(np.zeros((3, 2)), k=3)
  with pytest.raises(ValueError, match="generated must be a non-empty"):
    metrics.precision_recall(np.zeros((5, 2)), np.zeros((0, 2)))
  with pytest.raises(ValueError, match="do not match"):
    metrics.manifold_coverage(np.zeros((4, 3)), np.zeros((5, 2)), np.ones(5))
  with pytest.raises(ValueError, match="splits need"):
    metrics.inception_score(np.zeros((4, 3)), splits=5)
