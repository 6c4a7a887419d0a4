"""Encode a data set once into RVQ codes stored in the workdir, and read them back.

Layout under ``DIR/tokens/``:
  ``{split}.{p:05d}-of-{P:05d}.npz``: ``codes`` int16/int32 ``[N_p, h, w, D]`` and ``labels``
      int32 ``[N_p]`` encoded by process ``p`` of ``P`` (the examples of each process's
      slices of the sequential evaluation batches; order does not matter for training).
  ``meta.json``: grid shape, depth, codebook size, the tokenizer step the codes come from,
      and the process count that wrote the shards.
  ``codebooks.npz``: ``codebooks`` ``[C, V, d]`` of that tokenizer, so the generator stage
      needs only this directory.

Every file is written atomically, so an interrupted encoding never leaves a half-written
cache; a finished cache is never rewritten.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterable, Tuple

import jax
import numpy as np

from resgen_jax import data as data_lib
from resgen_jax.utils import files

TOKENS_DIR = "tokens"
META_FILE = "meta.json"
CODEBOOKS_FILE = "codebooks.npz"
INT16_MAX_CODES = 2 ** 15  # codes fit int16 (half the disk) below this codebook size


def shard_path(workdir: str, split: str, index: int, count: int) -> str:
  return os.path.join(workdir, TOKENS_DIR, f"{split}.{index:05d}-of-{count:05d}.npz")


def meta_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, META_FILE)


def is_cached(workdir: str, splits: Iterable[str], meta: dict) -> bool:
  """True when ``meta.json`` matches ``meta`` and every shard of every split exists."""
  path = meta_path(workdir)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  # The process count may differ (shards of another count are ignored); the data's
  # fingerprints are checked apart (pipeline.check_token_data), so older caches still load.
  without_count = lambda m: {k: v for k, v in m.items() if k not in ("process_count", "data")}
  if without_count(saved) != without_count(meta):
    raise ValueError(
        f"{path} describes codes from another tokenizer ({saved}) than this run's ({meta}); "
        f"remove {os.path.dirname(path)} to encode again")
  count = jax.process_count()
  return (saved.get("process_count") == meta.get("process_count")
          and os.path.exists(os.path.join(workdir, TOKENS_DIR, CODEBOOKS_FILE))
          and all(os.path.exists(shard_path(workdir, s, p, count))
                  for s in splits for p in range(count)))


def encode_split(encode_fn: Callable, batches: Iterable[dict], codebook_size: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Runs ``encode_fn(global_batch) -> codes`` over local batches; keeps valid examples.

  Args:
    encode_fn: maps a local batch dict (``image``, ``label``, ``valid``) to this process's
      codes ``[B/P, h, w, D]`` (numpy).
  Returns:
    ``codes [N_p, h, w, D]`` and ``labels [N_p]``.
  """
  dtype = np.int16 if codebook_size <= INT16_MAX_CODES else np.int32
  all_codes, all_labels = [], []
  for batch in batches:
    valid = np.asarray(batch["valid"], bool)
    all_codes.append(np.asarray(encode_fn(batch))[valid].astype(dtype))
    all_labels.append(np.asarray(batch["label"])[valid].astype(np.int32))
  return np.concatenate(all_codes), np.concatenate(all_labels)


def write_split(workdir: str, split: str, codes: np.ndarray, labels: np.ndarray) -> str:
  path = shard_path(workdir, split, jax.process_index(), jax.process_count())
  files.save_npz(path, codes=codes, labels=labels)
  return path


def write_meta(workdir: str, meta: dict, codebooks: np.ndarray) -> None:
  """Writes the codebooks, then ``meta.json`` last: its presence marks a complete cache."""
  if jax.process_index() == 0:
    files.save_npz(os.path.join(workdir, TOKENS_DIR, CODEBOOKS_FILE),
                   codebooks=np.asarray(codebooks, np.float32))
    files.save_json(meta_path(workdir), meta)


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


def load_tokens(workdir: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """All shards of a split: codes int32 ``[N, h, w, D]`` and labels int32 ``[N]``.

  Only the shards of the process count recorded in ``meta.json`` are read, so shards left
  by an encoding with another process count never mix in.
  """
  meta, _ = load_meta(workdir)
  pattern = os.path.join(workdir, TOKENS_DIR, f"{split}.*-of-{meta['process_count']:05d}.npz")
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(
        f"no cached tokens match {pattern}; run the 'encode' stage "
        f"(python -m resgen_jax.main --mode=encode ...) first")
  codes, labels = [], []
  for path in paths:
    with np.load(path, allow_pickle=False) as data:
      codes.append(data["codes"].astype(np.int32))
      labels.append(data["labels"].astype(np.int32))
  return np.concatenate(codes), np.concatenate(labels)


def _token_batch(batch: dict) -> dict:
  """An image-source batch over cached codes -> ``{"codes", "label"[, "valid"]}``."""
  out = dict(batch)
  out["codes"] = out.pop("image").astype(np.int32)
  return out


def token_source(workdir: str, split: str, num_classes: int, depth: int = 0):
  """The cached codes of a split as a random-access source (codes in its image field):
  their first ``depth`` depths (0: all), so generators of several depths can share one
  depth-D cache (a tokenizer trained with quantizer dropout decodes every prefix)."""
  codes, labels = load_tokens(workdir, split)
  if depth:
    codes = np.ascontiguousarray(codes[..., :depth])
  return data_lib.ArraySource(f"tokens/{split}", codes, labels, num_classes)


class TokenBatches:
  """Shuffled, resumable, per-process batches ``{"codes": [B/P, h, w, D], "label"}`` of
  cached codes: the data iterator of the image stages over a token source."""

  def __init__(self, source, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self._batches = data_lib.TrainIterator(source, global_batch_size, seed, process_index,
                                           process_count)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return _token_batch(next(self._batches))

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
