"""FID, Inception Score and precision/recall with the FID Inception, streamed in batches.

Images are read a batch at a time (from a sample ``.npz`` without loading the whole array,
or from a data set's evaluation pass), so a 50,000-image set never sits in memory; only
its 2048-d features and 1008-way logits do. The reference is either computed from the data
set or read from an ``.npz`` of the usual reference batches (``mu`` ``[2048]``, ``sigma``
``[2048, 2048]``, optionally ``activations`` ``[N, 2048]`` for precision/recall).
"""

from __future__ import annotations

import zipfile
from typing import Callable, Dict, Iterator, Optional, Tuple

import jax
import numpy as np

from resgen_jax.evaluation import features as features_lib
from resgen_jax.evaluation import classifier, inception, metrics

Array = np.ndarray
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}


def npz_member_batches(path: str, name: str, batch_size: int) -> Iterator[Array]:
  """Rows of array ``name`` in the ``.npz`` at ``path``, ``batch_size`` at a time, read
  from the archive as a stream (compressed or not) instead of all at once."""
  with zipfile.ZipFile(path) as archive:
    member = f"{name}.npy"
    if member not in archive.namelist():
      raise KeyError(f"{path} has no array '{name}' (it has "
                     f"{[n[:-4] for n in archive.namelist()]})")
    with archive.open(member) as f:
      version = np.lib.format.read_magic(f)
      if version not in HEADER_READERS:
        raise ValueError(f"{path}:{name} has .npy format version {version}")
      shape, fortran, dtype = HEADER_READERS[version](f)
      if fortran or dtype.hasobject:
        raise ValueError(f"{path}:{name} must be a C-ordered numeric array")
      row = int(np.prod(shape[1:])) * dtype.itemsize
      for start in range(0, shape[0], batch_size):
        count = min(batch_size, shape[0] - start)
        yield np.frombuffer(f.read(row * count), dtype).reshape(count, *shape[1:])


class InceptionFeatures:
  """The FID Inception as an extractor (:mod:`features`): uint8 images ``[n, H, W, C]`` ->
  pool features ``[n, 2048]`` and logits ``[n, 1008]`` (float64 on the host)."""

  def __init__(self, weights_path: str):
    self.variables = inception.load_params(weights_path)
    self._forward: Callable = jax.jit(inception.FIDInception().apply)

  def __call__(self, images) -> Tuple[Array, Array]:
    images = classifier.check_images(images)
    if images.shape[-1] == 1:  # grayscale data sets: the usual tools repeat the channel
      images = np.repeat(images, 3, axis=-1)
    f, l = self._forward(self.variables, images)
    return np.asarray(f, np.float64), np.asarray(l, np.float64)


def load_reference(path: str) -> features_lib.Reference:
  """The reference of a reference-batch ``.npz`` (``mu``, ``sigma``[, ``activations``])."""
  with np.load(path, allow_pickle=False) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"{path} must hold 'mu' [2048] and 'sigma' [2048, 2048] (it has "
                       f"{data.files})")
    ref = features_lib.Reference(
        mu=np.asarray(data["mu"], np.float64), sigma=np.asarray(data["sigma"], np.float64),
        activations=(np.asarray(data["activations"], np.float64)
                     if "activations" in data.files else None))
  dim = inception.FEATURES
  if ref.mu.shape != (dim,) or ref.sigma.shape != (dim, dim):
    raise ValueError(f"{path}: mu {ref.mu.shape} and sigma {ref.sigma.shape} must be "
                     f"[{dim}] and [{dim}, {dim}] (FID Inception pool features)")
  return ref


def score(features: Array, logits: Array, reference: features_lib.Reference,
          is_splits: Optional[int] = None) -> Dict[str, float]:
  """FID against ``reference``, Inception Score, and precision/recall when the reference
  has activations."""
  out = {"fid": reference.frechet_distance(features)}
  splits = is_splits or min(metrics.IS_SPLITS, features.shape[0])
  out["inception_score"], out["inception_score_std"] = metrics.inception_score(logits, splits)
  out.update(reference.precision_recall(features))
  return out
