"""Frechet distance between Gaussians fitted to feature sets (as in FID), in float64.

For ``N(mu1, s1)`` and ``N(mu2, s2)`` the distance is
``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))``.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
import scipy.linalg

# Largest imaginary part of diag(sqrtm(s1 s2)) accepted as rounding noise, relative to the
# largest real diagonal entry (and absolute below 1): the product of two PSD matrices has
# real non-negative eigenvalues, so anything larger means the inputs are not covariances.
MAX_RELATIVE_IMAGINARY = 1e-3


def gaussian_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Features ``[N, F]`` -> mean ``[F]`` and unbiased covariance ``[F, F]`` (float64)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, F], got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_shapes(mu1, sigma1, mu2, sigma2) -> None:
  """Raises a ValueError unless the means are ``[F]`` and the covariances ``[F, F]``."""
  shapes = f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f"means must both be [F]; got {shapes}")
  if sigma1.shape != (mu1.shape[0],) * 2 or sigma2.shape != sigma1.shape:
    raise ValueError(f"covariances must both be [F, F] with F = {mu1.shape[0]}; got {shapes}")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  """``scipy.linalg.sqrtm`` without its singular-matrix warning.

  Features with zero variance (e.g. ReLU units that never fire) make every covariance
  product singular; its square root is still accurate, and the caller checks the result.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(matrix)


def _sqrtm_product_trace(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """``tr(sqrtm(sigma1 sigma2))``, retrying with ``eps * I`` added when it is not finite."""
  root = _sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(root)):
    offset = eps * np.eye(sigma1.shape[0])
    root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if not np.all(np.isfinite(root)):
    raise ValueError(f"sqrtm(sigma1 sigma2) is not finite even with {eps} * I added")
  diagonal = np.diagonal(root)
  if np.iscomplexobj(diagonal):
    imaginary = np.max(np.abs(diagonal.imag))
    scale = max(1.0, np.max(np.abs(diagonal.real)))
    if imaginary > MAX_RELATIVE_IMAGINARY * scale:
      raise ValueError(f"sqrtm(sigma1 sigma2) has a large imaginary part ({imaginary:.3g}); "
                       "are both inputs symmetric positive semi-definite covariances?")
    diagonal = diagonal.real
  return float(np.sum(diagonal))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

  Args:
    mu1, mu2: means ``[F]``.
    sigma1, sigma2: covariances ``[F, F]``.
    eps: diagonal offset added to both covariances when ``sigma1 sigma2`` is too close to
      singular for a finite matrix square root (the retry of the standard FID tools).
  Returns:
    The distance, a float >= 0.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  _check_shapes(mu1, sigma1, mu2, sigma2)
  distance = (np.sum(np.square(mu1 - mu2)) + np.trace(sigma1) + np.trace(sigma2)
              - 2.0 * _sqrtm_product_trace(sigma1, sigma2, eps))
  # The exact value is never negative; rounding can push a zero distance slightly below.
  return max(float(distance), 0.0)


class StreamingStats:
  """Mean and unbiased covariance of features that arrive in batches ``[n, F]`` (float64).

  ``stats()`` equals :func:`gaussian_stats` of all batches concatenated.
  """

  def __init__(self):
    self.count = 0
    self.sum = None  # [F]
    self.outer_sum = None  # [F, F], sum of x x^T

  def update(self, features: np.ndarray) -> None:
    """Adds a batch ``[n, F]`` (n may be 0)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be [n, F], got shape {features.shape}")
    if self.sum is None:
      dim = features.shape[1]
      self.sum, self.outer_sum = np.zeros(dim), np.zeros((dim, dim))
    if features.shape[1] != self.sum.shape[0]:
      raise ValueError(f"features have {features.shape[1]} dimensions, earlier batches had "
                       f"{self.sum.shape[0]}")
    self.count += features.shape[0]
    self.sum += features.sum(axis=0)
    self.outer_sum += features.T @ features

  def stats(self) -> Tuple[np.ndarray, np.ndarray]:
    """-> mean ``[F]`` and unbiased covariance ``[F, F]`` of every feature seen so far."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    mu = self.sum / self.count
    sigma = (self.outer_sum - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma
