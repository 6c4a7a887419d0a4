"""One interface for the feature extractors behind every Frechet number.

An extractor is a callable ``images uint8 [n, H, W, C] -> (features [n, F], logits [n, K])``
(float64 numpy) that scores one batch; the project has two:

* :class:`ClassifierFeatures`: the classifier trained on the data set's own labels
  (:mod:`classifier`; any image size, no download);
* :class:`~resgen_jax.evaluation.fid.InceptionFeatures`: the FID Inception, from a weights
  file the user gives.

Sample sets, the training-time proxy and the tokenizer's reconstructions all go through
:func:`extract`, batch by batch, so images never need to be held together; a
:class:`Reference` holds what the real images contribute (their Gaussian and, for
precision/recall, their features).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Tuple

import numpy as np

from resgen_jax.evaluation import classifier, frechet, metrics

Array = np.ndarray
Extractor = Callable[[Array], Tuple[Array, Array]]


class ClassifierFeatures:
  """The project's classifier as an extractor: penultimate features and class logits."""

  def __init__(self, params, num_classes: int,
               batch_size: int = classifier.PREDICT_BATCH_SIZE, pool: str = "mean"):
    self.params, self.num_classes, self.batch_size = params, num_classes, batch_size
    self.pool = classifier.check_pool(pool)

  def __call__(self, images) -> Tuple[Array, Array]:
    logits, features = classifier.predict(self.params, self.num_classes, images,
                                          self.batch_size, self.pool)
    return features.astype(np.float64), logits.astype(np.float64)


def extract(extractor: Extractor, image_batches: Iterable[Array]) -> Tuple[Array, Array]:
  """Runs ``extractor`` over batches -> all features ``[N, F]`` and logits ``[N, K]``."""
  features, logits = [], []
  for images in image_batches:
    f, l = extractor(images)
    features.append(f)
    logits.append(l)
  if not features:
    raise ValueError("no images to extract features from")
  return np.concatenate(features), np.concatenate(logits)


@dataclasses.dataclass
class Reference:
  """The real side of a comparison: Gaussian ``mu [F]``, ``sigma [F, F]``, and the features
  ``[N, F]`` themselves when precision/recall are wanted (None otherwise)."""
  mu: Array
  sigma: Array
  activations: Optional[Array] = None

  @classmethod
  def from_features(cls, features: Array) -> "Reference":
    return cls(*frechet.gaussian_stats(features), activations=np.asarray(features, np.float64))

  def frechet_distance(self, features: Array) -> float:
    """Frechet distance between the Gaussian of ``features [N, F]`` and this one."""
    return frechet.frechet_distance(*frechet.gaussian_stats(features), self.mu, self.sigma)

  def precision_recall(self, features: Array) -> dict:
    """k-NN precision/recall of ``features`` against the reference features ({} without)."""
    if self.activations is None:
      return {}
    return metrics.precision_recall(self.activations, features)
