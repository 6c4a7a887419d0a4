"""Deterministic, resumable, per-process sharded batch iterators.

Training order: global batch ``n`` (0-based) holds the positions ``[n*B, (n+1)*B)`` of the
infinite concatenation of per-epoch permutations, epoch ``e`` being
``np.random.default_rng([seed, e]).permutation(N)`` (a batch may straddle two epochs).
Process ``p`` of ``P`` takes the contiguous slice ``[p*B/P, (p+1)*B/P)`` of every global
batch, so the data a step sees is the same whatever the process layout. The optional
horizontal flip is a function of ``(seed, global position)`` too. An iterator's state is
``{"batches": n}``; restoring it continues exactly where an uninterrupted run would be.

``imagenet2012`` does not fit in memory and is streamed from TFDS by
:class:`TFDSStreamIterator` instead: each process reads its own even share of the split's
records (so its order depends on the process count), shuffled with a seeded buffer.

Evaluation (:func:`eval_batches`) is one sequential pass, sharded the same way, with the
last batch padded to full size and a ``valid`` mask marking the real examples.

Batches are dicts of numpy arrays: ``image`` uint8 ``[B/P, H, W, C]``, ``label`` int32
``[B/P]`` and, for evaluation, ``valid`` bool ``[B/P]``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import ml_collections
import numpy as np

from resgen_jax.data import sources

# Third SeedSequence word of the flip stream, so flips are independent of the permutation
# drawn from ``[seed, epoch]``.
FLIP_STREAM = 1
# Chance that an example is mirrored when ``random_flip`` is on.
FLIP_PROBABILITY = 0.5
# Undecoded ImageNet JPEGs average ~110 kB, so 10,000 buffered records hold ~1 GB of host
# memory per process while mixing across many files.
DEFAULT_SHUFFLE_BUFFER = 10_000

Batch = Dict[str, np.ndarray]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """``B / P``; raises a ValueError unless ``P`` divides ``B``."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"the global batch size {global_batch_size} must be a positive multiple "
                     f"of the process count {process_count}")
  return global_batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must lie in [0, process_count="
                     f"{process_count})")


def check_state(state: dict) -> int:
  """The ``batches`` count of an iterator state ``{"batches": n}``."""
  batches = state.get("batches") if isinstance(state, dict) else None
  if not isinstance(batches, (int, np.integer)) or isinstance(batches, bool) or batches < 0:
    raise ValueError(f"a data iterator state must be {{'batches': <int >= 0>}}, got {state!r}")
  return int(batches)


def local_positions(batch_index: int, global_batch_size: int, process_index: int,
                    process_count: int) -> np.ndarray:
  """Positions in the infinite example stream of this process's slice -> int64 ``[B/P]``."""
  local = local_batch_size(global_batch_size, process_count)
  start = batch_index * global_batch_size + process_index * local
  return np.arange(start, start + local, dtype=np.int64)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of ``epoch`` -> int64 ``[N]``."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_flips(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Whether each position of ``epoch`` is mirrored -> bool ``[N]``."""
  rng = np.random.default_rng([seed, epoch, FLIP_STREAM])
  return rng.random(num_examples) < FLIP_PROBABILITY


def flip_where(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirrors ``images[i]`` (uint8 ``[n, H, W, C]``) left-right where ``flips[i]``."""
  return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


class TrainIterator:
  """Infinite shuffled batches of a random-access source; see the module docstring.

  ``__next__`` returns ``{"image": uint8 [B/P, H, W, C], "label": int32 [B/P]}``.
  """

  def __init__(self, source: sources.Source, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, random_flip: bool = False):
    check_process(process_index, process_count)
    local_batch_size(global_batch_size, process_count)
    if seed < 0:
      raise ValueError(f"the data seed must be >= 0, got {seed}")
    if not source.num_examples:
      raise ValueError(f"the source {source.name} has no examples")
    self.source = source
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.random_flip = random_flip
    self._batches = 0
    self._epochs = {}  # epoch -> (permutation, flips) of the epochs the last batch touched

  def __iter__(self) -> Iterator[Batch]:
    return self

  def _epoch_tables(self, epoch: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if epoch not in self._epochs:
      n = self.source.num_examples
      flips = epoch_flips(self.seed, epoch, n) if self.random_flip else None
      self._epochs[epoch] = (epoch_permutation(self.seed, epoch, n), flips)
    return self._epochs[epoch]

  def __next__(self) -> Batch:
    positions = local_positions(self._batches, self.global_batch_size, self.process_index,
                                self.process_count)
    epochs, offsets = np.divmod(positions, self.source.num_examples)
    indices = np.empty_like(positions)
    flips = np.zeros(positions.shape, bool)
    used = {int(e): self._epoch_tables(int(e)) for e in np.unique(epochs)}
    for epoch, (permutation, epoch_flip) in used.items():
      mask = epochs == epoch
      indices[mask] = permutation[offsets[mask]]
      if epoch_flip is not None:
        flips[mask] = epoch_flip[offsets[mask]]
    self._epochs = used
    images, labels = self.source.get(indices)
    if self.random_flip:
      images = flip_where(images, flips)
    self._batches += 1
    return {"image": images, "label": labels.astype(np.int32)}

  def get_state(self) -> dict:
    return {"batches": self._batches}

  def set_state(self, state: dict) -> None:
    self._batches = check_state(state)


def tf_resize_center_crop(image, size: int):
  """TF twin of :func:`sources.resize_center_crop`: uint8 ``[H, W, C]`` -> ``[size, size, C]``."""
  tf = sources.import_tensorflow()
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  scale = size / tf.minimum(height, width)
  new_height = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
  new_width = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
  resized = tf.image.resize(image, [new_height, new_width], method="bilinear", antialias=True)
  top, left = (new_height - size) // 2, (new_width - size) // 2
  cropped = resized[top:top + size, left:left + size]
  return tf.cast(tf.clip_by_value(tf.round(cropped), 0, 255), tf.uint8)


def tfds_process_split(split: str, process_index: int, process_count: int,
                       drop_remainder: bool):
  """This process's even share of a TFDS split (a TFDS split spec)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count, drop_remainder=drop_remainder)


def decode_and_resize_fn(builder, image_size: int):
  """Maps an undecoded ``image`` record to uint8 ``[image_size, image_size, C]``."""
  decode = builder.info.features["image"].decode_example
  return lambda encoded: tf_resize_center_crop(decode(encoded), image_size)


def stream_dataset(builder, split, seed: int, skip: int, local_batch: int, image_size: int,
                   random_flip: bool, shuffle_buffer: int):
  """An infinite, seeded, shuffled ``tf.data`` pipeline of local batches.

  Records stay undecoded through ``repeat``, ``shuffle`` and ``skip``, so resuming after
  ``skip`` records reads them but never decodes them. The flip of a record depends on
  ``(seed, its position in this process's stream)``.
  """
  tf = sources.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  records = builder.as_dataset(
      split=split, shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=seed),
      decoders={"image": tfds.decode.SkipDecoding()})
  records = records.map(lambda ex: (ex["image"], ex["label"]))
  records = records.repeat().shuffle(shuffle_buffer, seed=seed).enumerate().skip(skip)
  decode = decode_and_resize_fn(builder, image_size)

  def prepare(position, record):
    image = decode(record[0])
    if random_flip:
      flip_seed = tf.stack([tf.constant(seed, tf.int64), position])
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return {"image": image, "label": tf.cast(record[1], tf.int32)}

  batches = records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  batches = batches.batch(local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return batches.with_options(options).prefetch(tf.data.AUTOTUNE)


class TFDSStreamIterator:
  """Infinite shuffled batches streamed from a prepared TFDS dataset (ImageNet).

  Same interface as :class:`TrainIterator`. Each process reads
  ``tfds.split_for_jax_process(split)`` of the records, so the example order depends on the
  process count (unlike :class:`TrainIterator`). ``set_state({"batches": n})`` rebuilds the
  pipeline skipping ``n * B/P`` records (read, not decoded: resuming late in a long run
  costs one pass over those records' bytes).
  """

  def __init__(self, data_config: ml_collections.ConfigDict, split: str,
               global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, random_flip: bool = False,
               shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
    check_process(process_index, process_count)
    self.local_batch = local_batch_size(global_batch_size, process_count)
    self.builder = sources.tfds_builder(data_config)
    self.split = tfds_process_split(split, process_index, process_count, drop_remainder=True)
    self.image_size = data_config.image_size
    self.seed = seed
    self.random_flip = random_flip
    self.shuffle_buffer = shuffle_buffer
    self._batches = 0
    self._iterator = None  # built on the first __next__, after any set_state

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    if self._iterator is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      dataset = stream_dataset(self.builder, self.split, self.seed,
                               self._batches * self.local_batch, self.local_batch,
                               self.image_size, self.random_flip, self.shuffle_buffer)
      self._iterator = iter(tfds.as_numpy(dataset))
    batch = next(self._iterator)
    self._batches += 1
    return {"image": batch["image"], "label": batch["label"]}

  def get_state(self) -> dict:
    return {"batches": self._batches}

  def set_state(self, state: dict) -> None:
    self._batches = check_state(state)
    self._iterator = None


def make_train_iterator(data_config: ml_collections.ConfigDict, global_batch_size: int,
                        seed: int, process_index: int = 0, process_count: int = 1):
  """The training iterator of ``data.train_split``: streamed for ImageNet, else random access.

  Reads ``data.random_flip`` (default False) and, for streaming, ``data.shuffle_buffer``.
  """
  random_flip = bool(data_config.get("random_flip", False))
  if data_config.name in sources.STREAMING_SOURCES:
    return TFDSStreamIterator(
        data_config, data_config.train_split, global_batch_size, seed, process_index,
        process_count, random_flip,
        data_config.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER))
  source = sources.load_source(data_config, data_config.train_split)
  return TrainIterator(source, global_batch_size, seed, process_index, process_count,
                       random_flip)


def sequential_batches(source: sources.Source, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, max_examples: Optional[int] = None,
                       start_batch: int = 0) -> Iterator[Batch]:
  """One in-order pass over ``source`` sharded like training; see :func:`eval_batches`."""
  check_process(process_index, process_count)
  local_batch_size(global_batch_size, process_count)
  total = source.num_examples if max_examples is None else min(max_examples,
                                                               source.num_examples)
  for batch_index in range(start_batch, math.ceil(total / global_batch_size)):
    positions = local_positions(batch_index, global_batch_size, process_index, process_count)
    images, labels = source.get(np.minimum(positions, total - 1))
    yield {"image": images, "label": labels.astype(np.int32), "valid": positions < total}


def even_share(total: int, process_index: int, process_count: int) -> int:
  """How many of ``total`` examples process ``p`` gets when the first ones get one more."""
  return total // process_count + int(process_index < total % process_count)


def pad_batch(batch: Batch, size: int) -> Batch:
  """Repeats the last example of a non-empty local batch up to ``size``; adds ``valid``."""
  count = batch["label"].shape[0]
  rows = np.minimum(np.arange(size), count - 1)
  padded = {k: v[rows] for k, v in batch.items()}
  padded["valid"] = np.arange(size) < count
  return padded


def stream_eval_batches(data_config: ml_collections.ConfigDict, split: str,
                        global_batch_size: int, process_index: int = 0,
                        process_count: int = 1, max_examples: Optional[int] = None,
                        start_batch: int = 0) -> Iterator[Batch]:
  """One in-order pass over this process's share of a TFDS split, padded like training.

  Every process yields the same number of batches (that of the largest share); batches
  past the end of a smaller share repeat its last example with ``valid`` all False. With
  ``max_examples``, each process keeps its even share of them from the start of its shard.
  From ``start_batch`` on, the records before it are skipped unread (not decoded).
  """
  tf = sources.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  check_process(process_index, process_count)
  local = local_batch_size(global_batch_size, process_count)
  builder = sources.tfds_builder(data_config)
  counts = []
  for p in range(process_count):
    count = builder.info.splits[tfds_process_split(split, p, process_count, False)].num_examples
    if max_examples is not None:
      count = min(count, even_share(max_examples, p, process_count))
    counts.append(count)
  if not min(counts):
    raise ValueError(f"the TFDS split {split!r} of {data_config.name} has too few examples "
                     f"to give each of {process_count} processes one (shares: {counts})")
  decode = decode_and_resize_fn(builder, data_config.image_size)
  records = builder.as_dataset(split=tfds_process_split(split, process_index, process_count,
                                                        False),
                               shuffle_files=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
  own = counts[process_index]
  # Past the end of this share only its last example is read (for the padding batches).
  skip = min(start_batch * local, own - 1)
  dataset = records.take(own).skip(skip).map(
      lambda ex: {"image": decode(ex["image"]), "label": tf.cast(ex["label"], tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE).batch(local).prefetch(tf.data.AUTOTUNE)
  last = None
  for batch in tfds.as_numpy(dataset):
    last = pad_batch(batch, local)
    if start_batch * local < own:
      yield last
  real = max(math.ceil(own / local), start_batch)
  for _ in range(math.ceil(max(counts) / local) - real):
    yield {**last, "valid": np.zeros(local, bool)}


def eval_batches(data_config: ml_collections.ConfigDict, split: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 max_examples: Optional[int] = None, start_batch: int = 0) -> Iterator[Batch]:
  """One sequential pass (no shuffle, no flip) over ``split``, sharded by process.

  Global batch ``n`` holds positions ``[n*B, (n+1)*B)`` of the split (capped at
  ``max_examples``) and process ``p`` its slice ``[p*B/P, (p+1)*B/P)``. Positions past the
  end repeat the last example and are marked False in ``valid`` bool ``[B/P]``. ImageNet
  is streamed (see :func:`stream_eval_batches`). The pass starts at batch ``start_batch``
  (a resumed encoding) without reading the examples before it.
  """
  if data_config.name in sources.STREAMING_SOURCES:
    yield from stream_eval_batches(data_config, split, global_batch_size, process_index,
                                   process_count, max_examples, start_batch)
    return
  source = sources.load_source(data_config, split)
  yield from sequential_batches(source, global_batch_size, process_index, process_count,
                                max_examples, start_batch)


def load_all(data_config: ml_collections.ConfigDict, split: str) -> Tuple[np.ndarray,
                                                                         np.ndarray]:
  """Every example of a random-access split -> (uint8 ``[N, H, W, C]``, int32 ``[N]``)."""
  source = sources.load_source(data_config, split)
  return source.get(np.arange(source.num_examples))
