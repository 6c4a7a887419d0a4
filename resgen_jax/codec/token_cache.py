"""Encode a data set once into RVQ codes stored in the workdir, and read them back.

Layout under ``DIR/tokens/``:
  ``{split}.{p:05d}-of-{P:05d}.npz``: ``codes`` int16/int32 ``[N_p, h, w, D]`` and ``labels``
      int32 ``[N_p]`` encoded by process ``p`` of ``P`` (the examples of each process's
      slices of the sequential evaluation batches; order does not matter for training).
  ``meta.json``: grid shape, depth, codebook size, the tokenizer step the codes come from.

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

from resgen_jax.utils import files

TOKENS_DIR = "tokens"
META_FILE = "meta.json"
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
  if saved != meta:
    raise ValueError(
        f"{path} describes codes from another tokenizer ({saved}) than this run's ({meta}); "
        f"remove {os.path.dirname(path)} to encode again")
  count = jax.process_count()
  return all(os.path.exists(shard_path(workdir, s, p, count))
             for s in splits for p in range(count))


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


def write_meta(workdir: str, meta: dict) -> None:
  if jax.process_index() == 0:
    files.save_json(meta_path(workdir), meta)


def load_tokens(workdir: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """All shards of a split: codes int32 ``[N, h, w, D]`` and labels int32 ``[N]``."""
  pattern = os.path.join(workdir, TOKENS_DIR, f"{split}.*-of-*.npz")
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
