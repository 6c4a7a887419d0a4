"""Encode a data set once into RVQ codes stored in the workdir, and read them back.

Layout under ``DIR/tokens/``:
  ``{split}.{p:05d}-of-{P:05d}.{c:05d}.npz``: chunk ``c`` of process ``p`` of ``P``: ``codes``
      int16/int32 ``[N_pc, ...]`` and the per-example fields beside them (images: codes
      ``[N_pc, h, w, D]`` and ``labels`` int32 ``[N_pc]``; speech, ``audio/speech_tokens.py``:
      padded frames, lengths, texts, speakers) of the examples of that process's slices of
      ``num_batches`` sequential batches from ``first_batch`` (order does not matter for
      training). Caches written before chunks existed hold one
      ``{split}.{p:05d}-of-{P:05d}.npz`` per process; both are read.
  ``encoding.json``: the meta of an encoding in progress: its chunks resume only under it.
  ``meta.json``: grid shape, depth, codebook size, the tokenizer step the codes come from,
      and the process count that wrote the shards; written last, it marks a complete cache.
  ``codebooks.npz``: ``codebooks`` ``[C, V, d]`` of that tokenizer, so the generator stage
      needs only this directory.

Every file is written atomically, so an interrupted encoding never leaves a half-written
file: a rerun resumes after the last complete chunk of each process, and the files then
equal those of an uninterrupted run. A finished cache is never rewritten.

The generator reads the codes through memory maps of the (uncompressed) chunk files
(:class:`MappedTokenSource`): every host sees the whole cache but holds only the labels and
the pages its batches touch (ImageNet's 1.28M x 16 x 16 x 16 int16 codes: ~10 GB on disk).
A random batch of 256 costs ~2 ms from the page cache against ~0.5 ms from memory (2 CPU
cores, 100k examples in 200 chunks).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import zipfile
from typing import Callable, Iterable, Optional, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from resgen_jax import data as data_lib
from resgen_jax.train import preemption
from resgen_jax.utils import files

TOKENS_DIR = "tokens"
META_FILE = "meta.json"
CODEBOOKS_FILE = "codebooks.npz"
PENDING_FILE = "encoding.json"
CHUNK_RECORDS = ("first_batch", "num_batches")  # what a chunk file holds about itself
INT16_MAX_CODES = 2 ** 15  # codes fit int16 (half the disk) below this codebook size
# A zip local file header: signature, then fixed fields up to the name and extra lengths at
# bytes 26-29 (PKWARE APPNOTE 4.3.7); the member's data follows the name and extra field.
ZIP_LOCAL_SIGNATURE, ZIP_LOCAL_HEADER_BYTES = b"PK\x03\x04", 30


def _without_count(meta: dict) -> dict:
  """What must match for codes to be reused: not the process count (files of another count
  are ignored) nor the data's fingerprints (checked apart, stages.encode.check_token_data, so
  caches from before fingerprints still load)."""
  return {k: v for k, v in meta.items() if k not in ("process_count", "data")}


def chunk_path(workdir: str, split: str, index: int, count: int, chunk: int) -> str:
  return os.path.join(workdir, TOKENS_DIR, f"{split}.{index:05d}-of-{count:05d}.{chunk:05d}.npz")


def process_files(workdir: str, split: str, index: int, count: int) -> list:
  """The token files (chunks, or one legacy shard) of process ``index`` of ``count``."""
  return sorted(glob.glob(os.path.join(workdir, TOKENS_DIR,
                                       f"{split}.{index:05d}-of-{count:05d}*.npz")))


def meta_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, META_FILE)


def is_cached(workdir: str, splits: Iterable[str], meta: dict) -> bool:
  """True when ``meta.json`` matches ``meta`` and every shard of every split exists."""
  path = meta_path(workdir)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  if _without_count(saved) != _without_count(meta):
    raise ValueError(
        f"{path} describes codes from another tokenizer ({saved}) than this run's ({meta}); "
        f"remove {os.path.dirname(path)} to encode again")
  count = jax.process_count()
  return (saved.get("process_count") == meta.get("process_count")
          and os.path.exists(os.path.join(workdir, TOKENS_DIR, CODEBOOKS_FILE))
          and all(process_files(workdir, s, p, count) for s in splits for p in range(count)))


def begin_encoding(workdir: str, meta: dict) -> None:
  """Records the ``meta`` of an encoding about to start or resume (``encoding.json``);
  refuses the chunks of a partial encoding from another tokenizer or data."""
  path = os.path.join(workdir, TOKENS_DIR, PENDING_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    without_count = lambda m: {k: v for k, v in m.items() if k != "process_count"}
    if without_count(saved) != without_count(meta):  # the data's fingerprints count here
      raise ValueError(
          f"{os.path.dirname(path)} holds a partial encoding from another tokenizer or data "
          f"({saved}), not this run's ({meta}); remove the directory to encode again")
    if saved == meta:
      return
  if jax.process_index() == 0:
    files.save_json(path, meta)


def resume_point(workdir: str, split: str) -> Tuple[int, int]:
  """This process's complete chunks of ``split``: ``(how many, the batch after them)``."""
  chunk, batch = 0, 0
  index, count = jax.process_index(), jax.process_count()
  while os.path.exists(chunk_path(workdir, split, index, count, chunk)):
    with np.load(chunk_path(workdir, split, index, count, chunk), allow_pickle=False) as data:
      batch = int(data["first_batch"]) + int(data["num_batches"])
    chunk += 1
  return chunk, batch


def encode_split(workdir: str, split: str, encode_fn: Callable,
                 batches_from: Callable[[int], Iterable[dict]], codebook_size: int,
                 chunk_batches: int) -> int:
  """Encodes a split into chunk files of ``chunk_batches`` batches, resuming after the last
  complete chunk; polls for preemption between batches (a partial chunk is not written).

  Args:
    encode_fn: maps a local batch dict (with ``valid``, bool ``[B/P]``) to this process's
      rows: a dict of arrays ``[B/P, ...]`` holding ``codes`` and any per-example fields
      (images: ``labels``; speech: lengths, texts, speakers). Rows not ``valid`` (padding)
      are dropped; the codes are stored as int16 below ``INT16_MAX_CODES`` codes.
    batches_from: ``start_batch -> `` this process's local batches of the pass from there.
  Returns:
    how many valid examples this call encoded (0 when the split was already complete).
  """
  dtype = np.int16 if codebook_size <= INT16_MAX_CODES else np.int32
  chunk, first = resume_point(workdir, split)
  index, count = jax.process_index(), jax.process_count()
  rows, encoded = [], 0

  def flush(end: int) -> None:
    nonlocal chunk, first, rows, encoded
    fields = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    files.save_npz(chunk_path(workdir, split, index, count, chunk), **fields,
                   first_batch=np.int64(first), num_batches=np.int64(end - first))
    encoded += len(fields["codes"])
    chunk, first, rows = chunk + 1, end, []

  for number, batch in enumerate(preemption.checked(batches_from(first)), start=first):
    valid = np.asarray(batch["valid"], bool)
    out = {k: np.asarray(v)[valid] for k, v in encode_fn(batch).items()}
    rows.append(dict(out, codes=out["codes"].astype(dtype)))
    if number + 1 - first == chunk_batches:
      flush(number + 1)
  if rows:
    flush(first + len(rows))
  return encoded


def write_meta(workdir: str, meta: dict, codebooks: np.ndarray) -> None:
  """Writes the codebooks, then ``meta.json`` last (its presence marks a complete cache),
  once every process has written its chunks; the in-progress record goes."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("token_cache.write_meta")
  if jax.process_index() == 0:
    files.save_npz(os.path.join(workdir, TOKENS_DIR, CODEBOOKS_FILE),
                   codebooks=np.asarray(codebooks, np.float32))
    files.save_json(meta_path(workdir), meta)
    pending = os.path.join(workdir, TOKENS_DIR, PENDING_FILE)
    if os.path.exists(pending):
      os.remove(pending)


def load_meta(workdir: str) -> Tuple[dict, np.ndarray]:
  """``(meta, codebooks [C, V, d])`` of a complete token cache."""
  path = meta_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no token cache in {os.path.dirname(path)} ({META_FILE} is "
                            f"missing); run the 'encode' stage first")
  with open(path) as f:
    meta = json.load(f)
  with np.load(os.path.join(workdir, TOKENS_DIR, CODEBOOKS_FILE), allow_pickle=False) as data:
    return meta, data["codebooks"]


def split_files(workdir: str, split: str) -> list:
  """Every token file of a split, in order: only those of the process count recorded in
  ``meta.json``, so files left by an encoding with another process count never mix in."""
  meta, _ = load_meta(workdir)
  count = meta["process_count"]
  paths = [p for index in range(count) for p in process_files(workdir, split, index, count)]
  if not paths:
    raise FileNotFoundError(
        f"no cached tokens of {split!r} from {count} processes in "
        f"{os.path.join(workdir, TOKENS_DIR)}; run the 'encode' stage "
        f"(python -m resgen_jax.main --mode=encode ...) first")
  return paths


def load_fields(workdir: str, split: str) -> dict:
  """Every per-example field of a split's token files (``codes`` and what the encoding
  stored beside them), concatenated in file order, in memory."""
  fields = {}
  for path in split_files(workdir, split):
    with np.load(path, allow_pickle=False) as data:
      for name in data.files:
        if name not in CHUNK_RECORDS:
          fields.setdefault(name, []).append(data[name])
  return {name: np.concatenate(parts) for name, parts in fields.items()}


def load_tokens(workdir: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """All token files of an image split, in memory: codes int32 ``[N, h, w, D]``, labels
  int32 ``[N]``."""
  fields = load_fields(workdir, split)
  return fields["codes"].astype(np.int32), fields["labels"].astype(np.int32)


def map_npz_member(path: str, name: str) -> np.ndarray:
  """Array ``name`` of an uncompressed ``.npz`` (``np.savez``), memory-mapped read-only:
  its bytes are read from disk (or the page cache, shared by a host's processes) only when
  indexed. Zip64 members work; a compressed member is refused by name."""
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(name + ".npy")
  if info.compress_type != zipfile.ZIP_STORED:
    raise ValueError(f"{path}: {name!r} is compressed and cannot be memory-mapped")
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(ZIP_LOCAL_HEADER_BYTES)
    if local[:4] != ZIP_LOCAL_SIGNATURE:
      raise ValueError(f"{path}: no zip entry header where {name!r} should start")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + ZIP_LOCAL_HEADER_BYTES + name_length + extra_length)
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(f)
    offset = f.tell()
  if not shape or 0 in shape:  # a scalar, or nothing to map (mmap cannot map zero bytes)
    with np.load(path, allow_pickle=False) as data:
      return data[name]
  return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                   order="F" if fortran_order else "C")


@dataclasses.dataclass(frozen=True, eq=False)
class MappedTokenSource:
  """The cached codes of a split as a random-access source (codes in the image field),
  read through memory maps of its token files: a host holds only its labels (4 bytes per
  example) and the pages its batches touch, not the whole cache (ImageNet at 16x16x16 with
  int16 codes: ~10 GB). ``get`` returns int32 codes of the first ``depth`` depths.

  Attributes:
    name: ``"tokens/<split>"``, for logs.
    chunks: per token file, codes ``[N_c, h, w, D]`` (memory-mapped).
    starts: int64 ``[len(chunks) + 1]``: the index of every file's first example, then N.
    labels: int32 ``[N]``.
    num_classes: number of classes of the dataset.
    grid: ``(h, w)``.
    depth: depths returned (a prefix of the cache's D).
  """

  name: str
  chunks: Tuple[np.ndarray, ...]
  starts: np.ndarray
  labels: np.ndarray
  num_classes: int
  grid: Tuple[int, int]
  depth: int

  @property
  def num_examples(self) -> int:
    return int(self.starts[-1])

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.grid) + (self.depth,)

  def get(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """int ``[n]`` -> (int32 codes ``[n, h, w, depth]``, int32 labels ``[n]``)."""
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"{self.name}: indices must be in [0, {self.num_examples})")
    out = np.empty((len(indices),) + self.image_shape, np.int32)
    chunk = np.searchsorted(self.starts, indices, side="right") - 1
    for c in np.unique(chunk):
      rows = np.flatnonzero(chunk == c)
      local = indices[rows] - self.starts[c]
      order = np.argsort(local, kind="stable")  # ascending reads along the file
      out[rows[order]] = self.chunks[c][local[order], ..., :self.depth]
    return out, self.labels[indices]


def _token_batch(batch: dict) -> dict:
  """An image-source batch over cached codes -> ``{"codes", "label"[, "valid"]}``."""
  out = dict(batch)
  out["codes"] = out.pop("image").astype(np.int32)
  return out


def token_source(workdir: str, split: str, num_classes: int,
                 depth: int = 0) -> MappedTokenSource:
  """The cached codes of a split as a memory-mapped random-access source: their first
  ``depth`` depths (0: all), so generators of several depths can share one depth-D cache (a
  tokenizer trained with quantizer dropout decodes every prefix)."""
  chunks, labels = [], []
  for path in split_files(workdir, split):
    codes = map_npz_member(path, "codes")
    with np.load(path, allow_pickle=False) as data:
      labels.append(data["labels"].astype(np.int32))
    if len(codes) != len(labels[-1]):
      raise ValueError(f"{path}: {len(codes)} codes but {len(labels[-1])} labels")
    if len(codes):
      chunks.append(codes)
  meta, _ = load_meta(workdir)
  if not 0 <= depth <= meta["depth"]:
    raise ValueError(f"tokens/{split}: depth {depth} beyond the cache's {meta['depth']}")
  starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
  return MappedTokenSource(f"tokens/{split}", tuple(chunks), starts, np.concatenate(labels),
                           num_classes, tuple(meta["grid"]), depth or meta["depth"])


class TokenBatches:
  """Shuffled, resumable, per-process batches ``{"codes": [B/P, h, w, D], "label"}`` of
  cached codes: the generator's data iterator over a token source (the image pipeline's
  order). ``to_batch`` maps a pipeline batch to the generator's (speech:
  ``audio.speech_tokens.flat_batch``, which keeps the padding masks and text)."""

  def __init__(self, source, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, to_batch: Optional[Callable[[dict], dict]] = None):
    self._batches = data_lib.TrainIterator(source, global_batch_size, seed, process_index,
                                           process_count)
    self._to_batch = to_batch or _token_batch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self._to_batch(next(self._batches))

  def get_state(self) -> dict:
    return self._batches.get_state()

  def set_state(self, state: dict) -> None:
    self._batches.set_state(state)


def sequential_token_batches(source, global_batch_size: int, process_index: int = 0,
                             process_count: int = 1, max_examples=None):
  """One in-order pass over cached codes with a ``valid`` mask (evaluation)."""
  for batch in data_lib.sequential_batches(source, global_batch_size, process_index,
                                           process_count, max_examples):
    yield _token_batch(batch)
