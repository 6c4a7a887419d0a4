"""A small classifier trained on the data set's labels, for scoring class-conditional samples.

Where Inception does not fit (tiny images, no pretrained weights at hand) the project trains
its own feature extractor: :class:`Classifier` on the training split. It gives two numbers
for images generated for requested classes (:class:`ClassifierEvaluator`):

* ``class_agreement``: the fraction classified as the requested class;
* ``frechet_distance``: between Gaussians fitted to the classifier's penultimate features of
  the generated images and of real held-out images.

File format (:func:`save_classifier`): one msgpack file (flax serialization, no pickle) of a
map with ``meta``, a JSON string (format name and version, ``num_classes``, ``image_shape``
``[H, W, C]``, ``feature_dim``, ``pool``), and ``params``, the parameter tree. Version 1
files (before ``pool``) are read as ``pool="mean"``.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resgen_jax import data as data_lib
from resgen_jax.evaluation import fitting, frechet, metrics
from resgen_jax.utils import images as images_lib

# Width of the penultimate layer, the features of the Frechet distance: the covariance of
# F features needs well over F samples, and a few hundred held-out images are typical here.
FEATURE_DIM = 64
CONV_WIDTHS = (32, 64, 64)  # output channels of the three 3x3 convolutions
CONV_STRIDES = (1, 2, 2)  # 16x16 inputs end at 4x4 before global average pooling

# How the last feature map becomes the features: "mean" (global average pooling; position-
# blind, enough for the 16x16 digits) or "flatten" (every position's channels into the
# features layer). On MNIST (28x28, seed 0) "mean" reaches 0.960 held-out accuracy after
# 3000 steps, below the >= 0.98 a scorer of generated digits needs; "flatten" (the classic
# convolutional digit classifier: the features keep where the strokes are) reaches 0.991 after
# 1500 steps and 0.992 after 3000.
POOLS = ("mean", "flatten")

# Training defaults: 96.5-98% held-out accuracy on digits over seeds 0-3 (400 steps gave
# only ~95%) in about ten seconds on two CPU cores (34 epochs of its 1,500 training images).
NUM_STEPS = 800
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
PREDICT_BATCH_SIZE = 256

FILE_FORMAT = "resgen_jax.evaluation.classifier"  # the meta of every file save_classifier writes
FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no "pool" in the meta, always "mean"


class Classifier(nn.Module):
  """A small CNN for uint8 images ``[B, H, W, C]`` -> (logits ``[B, K]``, features ``[B, F]``).

  Attributes:
    num_classes: K, the number of classes.
    pool: one of POOLS, how the last feature map ``[B, h, w, c]`` becomes the input of the
      features layer.
  """
  num_classes: int
  pool: str = "mean"

  @nn.compact
  def __call__(self, images):
    x = images_lib.to_float(images)
    for i, (width, stride) in enumerate(zip(CONV_WIDTHS, CONV_STRIDES)):
      x = nn.relu(nn.Conv(width, (3, 3), strides=stride, name=f"conv{i}")(x))
    x = jnp.mean(x, axis=(1, 2)) if self.pool == "mean" else x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURE_DIM, name="features")(x))
    return nn.Dense(self.num_classes, name="logits")(features), features


def check_images(images, name: str = "images") -> np.ndarray:
  """-> ``images`` as a numpy uint8 ``[N, H, W, C]`` array, or a ValueError naming them."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"{name} must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
  return images


def _check_labels(labels, num_classes: int, count: int, name: str) -> np.ndarray:
  """-> ``labels`` as int32 ``[count]``, or a ValueError unless all lie in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integers [{count}], got {labels.dtype} {labels.shape}")
  if count and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


def check_pool(pool: str) -> str:
  if pool not in POOLS:
    raise ValueError(f"classifier pool must be one of {POOLS}, got {pool!r}")
  return pool


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     num_steps: int = NUM_STEPS, batch_size: int = BATCH_SIZE,
                     learning_rate: float = LEARNING_RATE, weight_decay: float = WEIGHT_DECAY,
                     seed: int = 0, pool: str = "mean"):
  """Trains a :class:`Classifier` with AdamW (cosine-decayed rate) on cross entropy.

  Args:
    images: uint8 ``[N, H, W, C]``.
    labels: int ``[N]`` in [0, num_classes).
    num_classes: K.
    num_steps, batch_size, learning_rate, weight_decay: the optimisation.
    seed: seeds the initialisation and the (numpy) batch order; equal seeds give equal
      parameters.
    pool: see :class:`Classifier`.
  Returns:
    The parameter tree (the ``params`` collection).
  """
  images = check_images(images, "images")
  labels = _check_labels(labels, num_classes, images.shape[0], "labels")
  if images.shape[0] == 0:
    raise ValueError("cannot train a classifier on 0 images")
  model = Classifier(num_classes, check_pool(pool))
  params = model.init(jax.random.PRNGKey(seed), images[:1])["params"]

  def loss_fn(params, images, labels):
    logits, _ = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  batches = ((images[i], labels[i]) for i in fitting.batch_indices(
      np.random.default_rng(seed), images.shape[0], batch_size, num_steps))
  return fitting.fit(loss_fn, params, batches, num_steps, learning_rate, weight_decay)


@functools.partial(jax.jit, static_argnames=("num_classes", "pool"))
def _forward(params, images, num_classes: int, pool: str):
  return Classifier(num_classes, pool).apply({"params": params}, images)


def predict(params, num_classes: int, images: np.ndarray,
            batch_size: int = PREDICT_BATCH_SIZE,
            pool: str = "mean") -> Tuple[np.ndarray, np.ndarray]:
  """uint8 ``[N, H, W, C]`` -> numpy (logits ``[N, K]``, features ``[N, FEATURE_DIM]``) of
  the :class:`Classifier` with ``params`` and ``pool``.

  Runs in batches of ``min(batch_size, N)``, the last one zero-padded, so one compilation
  serves every batch.
  """
  images = check_images(images, "images")
  count = images.shape[0]
  size = max(1, min(batch_size, count))
  logits = np.zeros((count, num_classes), np.float32)
  features = np.zeros((count, FEATURE_DIM), np.float32)
  for start in range(0, count, size):
    batch = images[start:start + size]
    padded = np.pad(batch, ((0, size - batch.shape[0]),) + ((0, 0),) * 3)
    batch_logits, batch_features = _forward(params, padded, num_classes, pool)
    logits[start:start + size] = np.asarray(batch_logits)[:batch.shape[0]]
    features[start:start + size] = np.asarray(batch_features)[:batch.shape[0]]
  return logits, features


def save_classifier(path: str, params, num_classes: int, image_shape: Sequence[int],
                    pool: str = "mean") -> None:
  """Writes the parameters and their metadata atomically to ``path`` (msgpack, no pickle)."""
  meta = dict(format=FILE_FORMAT, version=FILE_VERSION, num_classes=int(num_classes),
              image_shape=[int(d) for d in image_shape], feature_dim=FEATURE_DIM,
              pool=check_pool(pool))
  fitting.save_versioned(path, meta, params=params)


def _check_params(params, meta: dict) -> None:
  """Raises a ValueError unless ``params`` fit a :class:`Classifier` described by ``meta``."""
  model = Classifier(meta["num_classes"], meta["pool"])
  dummy = jnp.zeros((1,) + tuple(meta["image_shape"]), jnp.uint8)
  fitting.check_param_shapes(
      params, lambda: model.init(jax.random.PRNGKey(0), dummy)["params"],
      f"a Classifier with num_classes={meta['num_classes']}, pool={meta['pool']!r} on "
      f"{meta['image_shape']} images")


def load_classifier(path: str) -> Tuple[dict, dict]:
  """Reads a file of :func:`save_classifier` -> (params, meta).

  ``meta`` has ``num_classes``, ``image_shape`` (a tuple ``(H, W, C)``), ``feature_dim`` and
  ``pool``.
  Raises FileNotFoundError for a missing file and ValueError for one that is not a
  classifier file; both name ``path``.
  """
  try:
    contents, meta = fitting.read_versioned(path, FILE_FORMAT, READABLE_VERSIONS,
                                            "classifier")
    meta.setdefault("pool", "mean")  # version 1
    params = contents["params"]
    meta["image_shape"] = tuple(meta["image_shape"])
    _check_params(params, meta)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{path} is not a readable classifier file written by save_classifier "
                     f"({type(e).__name__}: {e}); remove it to train a new one") from e
  return params, meta


def get_or_train_classifier(path: str, data_config: ml_collections.ConfigDict,
                            num_classes: int, pool: str = "mean", **train_kwargs):
  """Loads the classifier at ``path``, or trains one on the training split and saves it there.

  Args:
    path: the classifier file.
    data_config: the ``data`` config; its ``train_split`` is the training data, and a saved
      classifier must be for ``image_size x image_size`` images.
    num_classes: K; a saved classifier must have the same.
    pool: see :class:`Classifier`; a saved classifier must have the same.
    **train_kwargs: passed to :func:`train_classifier` (only when no file exists yet; a
      saved classifier is reused whatever it was trained with).
  Returns:
    The parameter tree.
  """
  size = data_config.image_size

  def train():
    images, labels = data_lib.load_all(data_config, data_config.train_split)
    params = train_classifier(images, labels, num_classes, pool=pool, **train_kwargs)
    return params, dict(num_classes=num_classes, image_shape=images.shape[1:], pool=pool)

  def save(path, trained):
    params, meta = trained
    save_classifier(path, params, meta["num_classes"], meta["image_shape"], meta["pool"])

  params, _ = fitting.get_or_train(
      path, "classifier", dict(pool=pool, num_classes=num_classes, image_size=(size, size)),
      load=load_classifier,
      describe=lambda trained: dict(pool=trained[1]["pool"],
                                    num_classes=trained[1]["num_classes"],
                                    image_size=tuple(trained[1]["image_shape"][:2])),
      train=train, save=save)
  return params


def _agreement(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows of ``logits [N, K]`` whose argmax is the label ``[N]``."""
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def _stats_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  return frechet.frechet_distance(*frechet.gaussian_stats(features_a),
                                  *frechet.gaussian_stats(features_b))


class ClassifierEvaluator:
  """Scores class-conditional images against a real held-out set with a trained classifier.

  The Frechet distance grows as the sample shrinks (the covariance estimates get noisier),
  so compare numbers computed from similar numbers of images.

  Args:
    params: the :class:`Classifier` parameters.
    num_classes: K.
    reference_images: real held-out uint8 ``[N, H, W, C]``; generated images are compared
      with these and must have the same ``[H, W, C]``.
    reference_labels: their int labels ``[N]``.
    baseline_images: optional other real images ``[M, H, W, C]`` (e.g. the training split)
      for :meth:`reference`'s real-vs-real Frechet distance; without them it compares the
      even- and odd-indexed halves of the reference set.
    batch_size: images per classifier call.
    extractor: instead of ``params`` (None then), any classifier as a feature extractor
      ``images -> (features [n, F], logits [n, K])``, e.g. a pretrained CIFAR ResNet.
    pool: the :class:`Classifier` pool of ``params``.
  """

  def __init__(self, params, num_classes: int, reference_images: np.ndarray,
               reference_labels: np.ndarray, baseline_images: Optional[np.ndarray] = None,
               batch_size: int = PREDICT_BATCH_SIZE, extractor=None, pool: str = "mean"):
    self.num_classes = num_classes
    reference_images = check_images(reference_images, "reference_images")
    if extractor is None:
      self._classify = lambda images: predict(params, num_classes, images, batch_size, pool)
      channels = params["conv0"]["kernel"].shape[2]
      if reference_images.shape[-1] != channels:
        raise ValueError(f"reference_images have {reference_images.shape[-1]} channels, the "
                         f"classifier was trained on {channels}")
    else:
      self._classify = lambda images: extractor(images)[::-1]
    self.image_shape = reference_images.shape[1:]
    logits, self.reference_features = self._predict(reference_images, "reference_images")
    self.reference_accuracy = _agreement(logits, _check_labels(
        reference_labels, num_classes, reference_images.shape[0], "reference_labels"))
    self.reference_stats = frechet.gaussian_stats(self.reference_features)
    if baseline_images is None:
      compared, baseline_features = self.reference_features[0::2], self.reference_features[1::2]
    else:
      compared = self.reference_features
      _, baseline_features = self._predict(baseline_images, "baseline_images")
    self.baseline = dict(frechet_distance=_stats_distance(compared, baseline_features),
                         **metrics.precision_recall(compared, baseline_features))

  def _predict(self, images, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Checks ``images`` have the reference shape -> (logits ``[N, K]``, features ``[N, F]``)."""
    images = check_images(images, name)
    if images.shape[1:] != self.image_shape:
      raise ValueError(f"{name} have shape {images.shape[1:]} per image, the reference "
                       f"images {self.image_shape}")
    return self._classify(images)

  def evaluate(self, images: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Generated uint8 ``[N, H, W, C]`` for requested classes ``[N]`` -> their scores (see
    :meth:`evaluate_batches`)."""
    return self.evaluate_batches([images], labels)

  def evaluate_batches(self, image_batches: Iterable[np.ndarray],
                       labels: np.ndarray) -> Dict[str, float]:
    """Generated uint8 batches ``[n, H, W, C]`` (N images in all, scored a batch at a time)
    for requested classes ``[N]`` -> their scores.

    Returns:
      ``class_agreement``: fraction classified as the requested class;
      ``frechet_distance``: to the reference set's features (needs N >= 2);
      ``precision``, ``recall``: k-NN manifold precision and recall against the reference
      features (needs N > k, see :mod:`metrics`).
    """
    logits, features = [], []
    for images in image_batches:
      batch_logits, batch_features = self._predict(images, "images")
      logits.append(batch_logits)
      features.append(batch_features)
    logits, features = np.concatenate(logits), np.concatenate(features)
    labels = _check_labels(labels, self.num_classes, logits.shape[0], "labels")
    return dict(class_agreement=_agreement(logits, labels),
                frechet_distance=frechet.frechet_distance(*frechet.gaussian_stats(features),
                                                          *self.reference_stats),
                **metrics.precision_recall(self.reference_features, features))

  def reference(self) -> Dict[str, float]:
    """The same scores for real data, to print beside :meth:`evaluate`'s.

    Returns:
      ``class_agreement``: the classifier's accuracy on the reference set;
      ``frechet_distance``, ``precision``, ``recall``: baseline images vs the reference set
      (or its odd- vs its even-indexed half).
    """
    return dict(class_agreement=self.reference_accuracy, **self.baseline)
