"""Random-access image sources: every image comes back resized and center-cropped.

A source holds one split of a dataset and answers ``get(indices)`` with uint8 images
``[n, image_size, image_size, C]`` and int32 labels ``[n]``. :func:`load_source` builds one
from the ``data`` config:

* ``digits``: scikit-learn's 1,797 8x8 digits, embedded (no download), split 1,500 / 297.
* ``npz``: a user file with ``images`` uint8 ``[N, H, W, C]`` (C in {1, 3}) and ``labels``.
* ``folder``: one sub-folder per class (sorted names -> class ids), images read lazily as RGB.
* ``mnist``, ``cifar10``: TensorFlow Datasets, loaded whole into memory.
* ``imagenet2012``: too large for memory, so it has no random-access source; it is streamed
  by :class:`resgen_jax.data.pipeline.TFDSStreamIterator`. TFDS cannot download ImageNet:
  put ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` into the TFDS
  ``manual_dir`` (by default ``<data_dir>/downloads/manual``) and run
  ``tfds build imagenet2012 --data_dir=<data_dir> --manual_dir=<manual_dir>`` once.

For ``digits``, ``npz`` and ``folder`` the split named ``data.train_split`` is the training
split and any other name is the evaluation split; TFDS sources pass the split name to TFDS.
TensorFlow is imported only by the TFDS sources, so the others start fast.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import multiprocessing
import os
import zipfile
from typing import Dict, Optional, Protocol, Sequence, Tuple

import ml_collections
import numpy as np
from PIL import Image

# Sources that fit in host memory (or are read lazily per example) and support ``get``.
RANDOM_ACCESS_SOURCES = ("digits", "npz", "folder", "mnist", "cifar10")
# Sources read as a stream of records (see pipeline.TFDSStreamIterator).
STREAMING_SOURCES = ("imagenet2012",)
SOURCE_NAMES = RANDOM_ACCESS_SOURCES + STREAMING_SOURCES

# Bilinear (antialiased by PIL when shrinking) for every source: smooth enough for the 8x8
# digits upsampling and alias-free for downsampling; the TF streaming path matches it.
RESAMPLE = Image.Resampling.BILINEAR
# Channels of the images a source may hold: grayscale or RGB.
VALID_CHANNELS = (1, 3)
# Folder images are converted to RGB, so every folder source has this many channels.
FOLDER_CHANNELS = 3
# Image file types read from class folders (compared lower-case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# The arrays a user's .npz file must hold.
NPZ_KEYS = ("images", "labels")
NPZ_MAGIC, NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"  # a zip archive; a single .npy array

# scikit-learn's digits hold values 0..16; they are scaled to 0..255.
DIGITS_MAX_VALUE = 16
# Seed of the fixed train / eval permutation of the digits (never changes, so results from
# different runs are comparable).
DIGITS_SPLIT_SEED = 0
# The first 1,500 permuted digits train; the remaining 297 are held out for evaluation.
DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_EXAMPLES = 1797


class Source(Protocol):
  """What the pipeline needs from a random-access source."""

  name: str
  num_classes: int

  @property
  def num_examples(self) -> int:
    ...

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    ...

  def get(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory, already at the final size.

  Attributes:
    name: ``"<dataset>/<split>"``, for logs.
    images: uint8 ``[N, H, W, C]``.
    labels: int32 ``[N]`` in ``[0, num_classes)``.
    num_classes: number of classes of the dataset.
  """

  name: str
  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def get(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """int ``[n]`` -> (uint8 ``[n, H, W, C]``, int32 ``[n]``)."""
    indices = np.asarray(indices)
    return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource:
  """Images in class folders, read from disk in :meth:`get` (RGB, resized, cropped).

  Attributes:
    name: ``"folder/<split>"``, for logs.
    paths: one image file per example.
    labels: int32 ``[N]``: the index of each file's class folder in sorted order.
    image_size: the side of the returned square images.
    num_classes: number of classes of the dataset (at least the number of folders).
    workers: image-decoding processes (``data.workers``; 0: in this process).
  """

  name: str
  paths: Tuple[str, ...]
  labels: np.ndarray
  image_size: int
  num_classes: int
  workers: int = 0  # decode processes (:func:`decode_files`)

  @property
  def num_examples(self) -> int:
    return len(self.paths)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return (self.image_size, self.image_size, FOLDER_CHANNELS)

  def get(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """int ``[n]`` -> (uint8 ``[n, image_size, image_size, 3]``, int32 ``[n]``), decoded
    by ``workers`` processes (see :func:`decode_files`)."""
    indices = np.asarray(indices)
    images = decode_files([self.paths[i] for i in indices.reshape(-1)], self.image_size,
                          self.workers)
    images = np.stack(images) if images else np.zeros((0,) + self.image_shape, np.uint8)
    return images.reshape(indices.shape + self.image_shape), self.labels[indices]


_POOLS: Dict[int, concurrent.futures.Executor] = {}  # worker count -> its decode processes


def decode_file(path: str, size: int) -> np.ndarray:
  """One image file -> uint8 ``[size, size, 3]`` (decoded, shorter side resized, cropped)."""
  return resize_center_crop(read_rgb_image(path), size)


def decode_files(paths: Sequence[str], size: int, workers: int = 0) -> list:
  """:func:`decode_file` of every path, in order: here (``workers == 0``) or spread over a
  pool of ``workers`` processes (``-1``: one per host core), started on first use and kept
  for the process's life. Processes are spawned, not forked (forking a process that runs
  JAX's threads can deadlock); an unreadable file's error names it, as in-process."""
  if workers == 0 or len(paths) <= 1:
    return [decode_file(p, size) for p in paths]
  count = os.cpu_count() if workers < 0 else workers
  if count not in _POOLS:
    if not _POOLS:  # stopped before the interpreter tears down what they use
      atexit.register(lambda: [pool.shutdown(cancel_futures=True) for pool in _POOLS.values()])
    _POOLS[count] = concurrent.futures.ProcessPoolExecutor(
        count, mp_context=multiprocessing.get_context("spawn"))
  chunk = max(1, len(paths) // (4 * count))  # a few chunks per process balance the load
  return list(_POOLS[count].map(decode_file, paths, itertools.repeat(size), chunksize=chunk))


def check_image_size(image_size: int, downsample_factor: int) -> None:
  """Raises a ValueError unless ``image_size`` is a positive multiple of the factor."""
  if image_size <= 0 or image_size % downsample_factor:
    suggestion = max(downsample_factor, round(image_size / downsample_factor) * downsample_factor)
    raise ValueError(
        f"image_size {image_size} is not divisible by the tokenizer's downsampling factor "
        f"{downsample_factor} (2x per level after the first of channel_multipliers); set "
        f"--config.data.image_size to a multiple of {downsample_factor}, e.g. {suggestion}")


def scaled_shape(height: int, width: int, size: int) -> Tuple[int, int]:
  """The ``(height, width)`` whose shorter side is ``size``, keeping the aspect ratio."""
  if height <= width:
    return size, max(size, round(width * size / height))
  return max(size, round(height * size / width)), size


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 ``[H, W, C]`` -> uint8 ``[size, size, C]``: shorter side to ``size``, center crop.

  C must be 1 or 3. An image already ``size`` x ``size`` is returned unchanged.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in VALID_CHANNELS:
    raise ValueError(f"resize_center_crop expects a uint8 [H, W, C] image with C in "
                     f"{VALID_CHANNELS}, got {image.dtype} of shape {image.shape}")
  height, width, channels = image.shape
  if (height, width) == (size, size):
    return image
  new_height, new_width = scaled_shape(height, width, size)
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((new_width, new_height), resample=RESAMPLE))
  top, left = (new_height - size) // 2, (new_width - size) // 2
  return resized.reshape(new_height, new_width, channels)[top:top + size, left:left + size]


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 ``[N, H, W, C]`` -> uint8 ``[N, size, size, C]`` (see :func:`resize_center_crop`)."""
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((images.shape[0], size, size, images.shape[-1]), np.uint8)
  for i, image in enumerate(images):
    out[i] = resize_center_crop(image, size)
  return out


def read_rgb_image(path: str) -> np.ndarray:
  """Decodes one image file -> uint8 ``[H, W, 3]``; a ValueError names an unreadable file."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read the image file {path}: {e}") from e


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
  """Checks integer labels ``[N]`` lie in ``[0, num_classes)`` -> int32 ``[N]``."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{where}: labels must lie in [0, num_classes={num_classes}) but range from "
        f"{labels.min()} to {labels.max()}; fix the labels or raise --config.data.num_classes")
  return labels.astype(np.int32)


def is_train_split(data_config: ml_collections.ConfigDict, split: str) -> bool:
  return split == data_config.train_split


def split_path(data_config: ml_collections.ConfigDict, split: str) -> str:
  """The file or folder of ``split``: ``path`` for training, else ``eval_path`` or ``path``."""
  if not data_config.path:
    raise ValueError(f"data.name={data_config.name!r} needs --config.data.path (the "
                     f"{'.npz file' if data_config.name == 'npz' else 'class folder root'})")
  if is_train_split(data_config, split):
    return data_config.path
  if not data_config.get("eval_path"):
    logging.warning(
        "data.eval_path is not set: the %r split is read from the TRAINING data %s, so "
        "every held-out number (real Frechet distance, class agreement) is measured on "
        "training images; set --config.data.eval_path to a held-out file or folder",
        split, data_config.path)
  return data_config.get("eval_path") or data_config.path


def digits_split_indices() -> Tuple[np.ndarray, np.ndarray]:
  """The fixed (train ``[1500]``, eval ``[297]``) indices into scikit-learn's digits."""
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(DIGITS_NUM_EXAMPLES)
  return order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]


def digits_images() -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits -> (uint8 ``[1797, 8, 8, 1]`` in 0..255, int ``[1797]``)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  # slow import
  digits = datasets.load_digits()
  images = np.round(digits.images * 255.0 / DIGITS_MAX_VALUE).astype(np.uint8)
  return images[..., None], digits.target


def load_digits(data_config: ml_collections.ConfigDict, split: str) -> ArraySource:
  images, labels = digits_images()
  train, held_out = digits_split_indices()
  indices = train if is_train_split(data_config, split) else held_out
  return ArraySource(
      name=f"digits/{split}",
      images=resize_all(images[indices], data_config.image_size),
      labels=check_labels(labels[indices], data_config.num_classes, "digits"),
      num_classes=data_config.num_classes)


def read_npz_arrays(path: str) -> dict:
  """The ``images`` and ``labels`` arrays of a .npz file (whichever it has)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the npz file {path} does not exist")
  unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile)
  with open(path, "rb") as f:
    magic = f.read(len(NPZ_MAGIC))
  if magic not in (NPZ_MAGIC, NPY_MAGIC[:len(NPZ_MAGIC)]):
    raise ValueError(f"the npz file {path} is not a readable .npz archive (a zip of .npy "
                     f"arrays; it starts with {magic!r}): write it with "
                     f"np.savez(path, images=..., labels=...)")
  try:
    archive = np.load(path, allow_pickle=False)
  except unreadable as e:
    raise ValueError(f"the npz file {path} is not a readable .npz archive: {e}") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"the npz file {path} holds a single .npy array, not an .npz archive "
                     f"with 'images' and 'labels' (write it with np.savez)")
  with archive:
    try:
      return {k: archive[k] for k in NPZ_KEYS if k in archive.files}
    except unreadable as e:
      raise ValueError(f"the npz file {path} is corrupt: {e}") from e


def read_npz(path: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """Reads and validates a user's .npz -> (uint8 ``[N, H, W, C]``, int32 ``[N]``)."""
  arrays = read_npz_arrays(path)
  missing = [k for k in NPZ_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"the npz file {path} lacks the key(s) {missing}; it needs "
                     f"{list(NPZ_KEYS)}")
  images, labels = arrays["images"], arrays["labels"]
  if images.ndim != 4 or images.shape[-1] not in VALID_CHANNELS:
    raise ValueError(f"the npz file {path}: 'images' must be [N, H, W, C] with C in "
                     f"{VALID_CHANNELS}, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"the npz file {path}: 'images' must be uint8 in 0..255, got "
                     f"{images.dtype}")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"the npz file {path}: 'labels' must be a 1-D integer array, got "
                     f"{labels.dtype} of shape {labels.shape}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"the npz file {path} has {images.shape[0]} images but "
                     f"{labels.shape[0]} labels")
  if not images.shape[0]:
    raise ValueError(f"the npz file {path} holds no examples")
  return images, check_labels(labels, num_classes, f"the npz file {path}")


def load_npz(data_config: ml_collections.ConfigDict, split: str) -> ArraySource:
  images, labels = read_npz(split_path(data_config, split), data_config.num_classes)
  return ArraySource(name=f"npz/{split}", images=resize_all(images, data_config.image_size),
                     labels=labels, num_classes=data_config.num_classes)


def is_image_file(filename: str) -> bool:
  return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")


def class_image_files(class_dir: str) -> list:
  """Sorted image files under ``class_dir`` (searched recursively)."""
  found = []
  for directory, subdirs, filenames in os.walk(class_dir):
    subdirs.sort()
    found.extend(os.path.join(directory, f) for f in sorted(filenames) if is_image_file(f))
  return found


def scan_folder(root: str, num_classes: int) -> Tuple[Tuple[str, ...], np.ndarray]:
  """Lists ``root/<class>/...`` images -> (paths, int32 labels ``[N]``) by sorted class name."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"the image folder {root} does not exist")
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise ValueError(f"the image folder {root} has no class sub-folders; expected "
                     f"{root}/<class name>/<image files>")
  if len(classes) > num_classes:
    raise ValueError(f"the image folder {root} has {len(classes)} class sub-folders but "
                     f"--config.data.num_classes is {num_classes}")
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = class_image_files(os.path.join(root, name))
    if not files:
      logging.warning("the class folder %s holds no image files: class %d (%r) gets no "
                      "examples in this split, yet is still sampled and scored",
                      os.path.join(root, name), label, name)
    paths.extend(files)
    labels.extend([label] * len(files))
  if not paths:
    raise ValueError(f"the image folder {root} has class sub-folders {classes[:5]}... but "
                     f"no image files with extensions {IMAGE_EXTENSIONS}")
  return tuple(paths), np.asarray(labels, np.int32)


def load_folder(data_config: ml_collections.ConfigDict, split: str) -> FolderSource:
  paths, labels = scan_folder(split_path(data_config, split), data_config.num_classes)
  workers = int(data_config.get("workers", 0))
  if workers < -1:
    raise ValueError(f"data.workers must be >= -1 (0: decode in the training process, -1: "
                     f"one process per core), got {workers}")
  return FolderSource(name=f"folder/{split}", paths=paths, labels=labels,
                      image_size=data_config.image_size, num_classes=data_config.num_classes,
                      workers=workers)


def tfds_data_dir(data_config: ml_collections.ConfigDict) -> Optional[str]:
  """``data.data_dir``, with an empty string meaning the TFDS default."""
  return data_config.get("data_dir") or None


def import_tensorflow():
  """Imports TensorFlow with its GPUs hidden, so it leaves accelerator memory to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf


def not_prepared_message(name: str, data_dir: str) -> str:
  if name == "imagenet2012":
    how = (f"TFDS cannot download ImageNet: put ILSVRC2012_img_train.tar and "
           f"ILSVRC2012_img_val.tar into the manual_dir (default "
           f"{data_dir}/downloads/manual) and run `tfds build imagenet2012 "
           f"--data_dir={data_dir} --manual_dir=<manual_dir>`")
  else:
    how = (f"prepare it once with `tfds build {name} --data_dir={data_dir}` or set "
           f"--config.data.download=True")
  return f"the TFDS dataset {name} is not prepared in data_dir {data_dir}; {how}"


def tfds_builder(data_config: ml_collections.ConfigDict):
  """The prepared TFDS builder of ``data.name``; prepares it only if ``data.download``."""
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(data_config.name, data_dir=tfds_data_dir(data_config))
  if not builder.is_prepared():
    if not data_config.get("download", False):
      raise FileNotFoundError(not_prepared_message(data_config.name, builder.data_dir_root))
    builder.download_and_prepare()
  return builder


def load_tfds(data_config: ml_collections.ConfigDict, split: str) -> ArraySource:
  """A TFDS split loaded whole into memory, resized to ``data.image_size``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builder(data_config)
  data = tfds.as_numpy(tfds.load(
      data_config.name, split=split, data_dir=tfds_data_dir(data_config),
      batch_size=-1, download=data_config.get("download", False), as_supervised=False))
  where = f"the TFDS dataset {data_config.name} ({builder.data_dir}, split {split})"
  return ArraySource(
      name=f"{data_config.name}/{split}",
      images=resize_all(data["image"], data_config.image_size),
      labels=check_labels(data["label"], data_config.num_classes, where),
      num_classes=data_config.num_classes)


def fingerprint(data_config: ml_collections.ConfigDict, split: str) -> dict:
  """What a split's examples are, independent of where they live: the number of examples
  and a SHA-256 over their pixels and labels (in-memory sources) or their file names
  relative to the class root, sizes and labels (folders); streamed sources by name and
  split. Equal fingerprints: the same data (a moved folder or file still matches)."""
  if data_config.name in STREAMING_SOURCES:
    return {"source": data_config.name, "split": split}
  source = load_source(data_config, split)
  digest = hashlib.sha256()
  if isinstance(source, FolderSource):
    root = split_path(data_config, split)
    for path, label in zip(source.paths, source.labels):
      digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\t{label}\n"
                    .encode())
  else:
    digest.update(np.ascontiguousarray(source.images).tobytes())
    digest.update(np.ascontiguousarray(source.labels, np.int64).tobytes())
  return {"source": data_config.name, "examples": source.num_examples,
          "image_shape": list(source.image_shape), "sha256": digest.hexdigest()}


def load_source(data_config: ml_collections.ConfigDict, split: str) -> Source:
  """The random-access source of ``split`` of the dataset ``data_config`` names."""
  loaders = {"digits": load_digits, "npz": load_npz, "folder": load_folder,
             "mnist": load_tfds, "cifar10": load_tfds}
  name = data_config.name
  if name in STREAMING_SOURCES:
    raise ValueError(f"data.name={name!r} is streamed, not random access: use "
                     f"pipeline.make_train_iterator / pipeline.eval_batches")
  if name not in loaders:
    raise ValueError(f"unknown data.name {name!r}; valid names are {SOURCE_NAMES}")
  return loaders[name](data_config, split)
