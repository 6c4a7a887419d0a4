"""FID, Inception Score and precision/recall with the FID Inception, streamed in batches.

Images are read a batch at a time (from a sample ``.npz`` without loading the whole array,
or from a data set's evaluation pass), so a 50,000-image set never sits in memory; only
its 2048-d features and 1008-way logits do. The reference is either computed from the data
set or read from an ``.npz`` of the usual reference batches (``mu`` ``[2048]``, ``sigma``
``[2048, 2048]``, optionally ``activations`` ``[N, 2048]`` for precision/recall).
"""

from __future__ import annotations

import zipfile
from typing import Callable, Dict, Iterable, Iterator, Optional

import jax
import numpy as np

from resgen_jax.evaluation import frechet, inception, metrics

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
  """Batches of uint8 images ``[n, H, W, 3]`` -> features ``[N, 2048]`` and logits
  ``[N, 1008]`` (float64 on the host), through the jitted FID Inception."""

  def __init__(self, weights_path: str):
    self.variables = inception.load_params(weights_path)
    self._forward: Callable = jax.jit(inception.FIDInception().apply)

  def __call__(self, image_batches: Iterable[Array]):
    features, logits = [], []
    for images in image_batches:
      images = np.asarray(images)
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} "
                         f"{images.shape}")
      if images.shape[-1] == 1:  # grayscale data sets: the usual tools repeat the channel
        images = np.repeat(images, 3, axis=-1)
      f, l = self._forward(self.variables, images)
      features.append(np.asarray(f, np.float64))
      logits.append(np.asarray(l, np.float64))
    if not features:
      raise ValueError("no images to score")
    return np.concatenate(features), np.concatenate(logits)


def load_reference(path: str) -> Dict[str, Array]:
  """``{"mu", "sigma"[, "activations"]}`` from a reference-batch ``.npz``."""
  with np.load(path, allow_pickle=False) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"{path} must hold 'mu' [2048] and 'sigma' [2048, 2048] (it has "
                       f"{data.files})")
    ref = {"mu": np.asarray(data["mu"], np.float64),
           "sigma": np.asarray(data["sigma"], np.float64)}
    if "activations" in data.files:
      ref["activations"] = np.asarray(data["activations"], np.float64)
  dim = inception.FEATURES
  if ref["mu"].shape != (dim,) or ref["sigma"].shape != (dim, dim):
    raise ValueError(f"{path}: mu {ref['mu'].shape} and sigma {ref['sigma'].shape} must be "
                     f"[{dim}] and [{dim}, {dim}] (FID Inception pool features)")
  return ref


def reference_from_features(features: Array) -> Dict[str, Array]:
  mu, sigma = frechet.gaussian_stats(features)
  return {"mu": mu, "sigma": sigma, "activations": features}


def score(features: Array, logits: Array, reference: Dict[str, Array],
          is_splits: Optional[int] = None) -> Dict[str, float]:
  """FID against ``reference``, Inception Score, and precision/recall when the reference
  has activations."""
  out = {"fid": frechet.frechet_distance(*frechet.gaussian_stats(features),
                                         reference["mu"], reference["sigma"])}
  splits = is_splits or min(metrics.IS_SPLITS, features.shape[0])
  out["inception_score"], out["inception_score_std"] = metrics.inception_score(logits, splits)
  if "activations" in reference:
    out.update(metrics.precision_recall(reference["activations"], features))
  return out
