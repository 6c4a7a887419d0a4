"""The speech token cache and the generator's data over it.

The ``encode`` stage (:func:`resgen_jax.audio.tts.run_encode`) writes, under ``DIR/tokens``:

* ``speech_<split>.npz`` (:func:`write_speech_tokens`): every utterance's token frames
  ``[L_i, D]``, padded to the longest, with their lengths, transcripts, speakers and ids;
* ``codebooks.npz``: the codec's codebooks ``[D, K, d]``;
* ``meta.json``: what made them (codec, audio front end, corpus), written last.

:func:`speech_token_source` fits a split to the generator (frames, text tokens) as a
random-access source, and :class:`SpeechTokenBatches` draws its shuffled, resumable
per-process batches in the image pipeline's order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from resgen_jax.audio import corpus
from resgen_jax.codec import token_cache
from resgen_jax.data import pipeline as data_pipeline
from resgen_jax.utils import files

TOKENS_DIR = "tokens"
SPEECH_META = {"kind": "speech"}  # marks a token cache of speech utterances
SPEECH_CLASSES = 1  # the generator's class input is constant for speech (plus the null class)


def cache_path(workdir: str, split: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, f"speech_{split}.npz")


def codebooks_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, "codebooks.npz")


def meta_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, "meta.json")


def write_speech_tokens(path: str, utterances: Sequence[corpus.Utterance],
                        codes: Sequence[np.ndarray]) -> None:
  """Writes ``codes`` int16 (int32 for codebooks above 2**15) ``[N, L_max, D]`` (zero past
  each ``lengths[i]``), ``lengths``, ``texts``, ``speakers``, ``uids`` (unicode arrays: no
  pickle)."""
  length = max(c.shape[0] for c in codes)
  padded = np.stack([np.pad(c, ((0, length - c.shape[0]), (0, 0))) for c in codes])
  small = int(padded.max(initial=0)) < token_cache.INT16_MAX_CODES  # half the disk
  files.save_npz(path, codes=padded.astype(np.int16 if small else np.int32), lengths=np.asarray(
      [c.shape[0] for c in codes], np.int32), texts=np.asarray([u.text for u in utterances]),
                 speakers=np.asarray([u.speaker for u in utterances]),
                 uids=np.asarray([u.uid for u in utterances]))


def load_speech_tokens(workdir: str, split: str) -> dict:
  path = cache_path(workdir, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no speech tokens at {path}; run the 'encode' stage first")
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def load_codebooks(workdir: str) -> np.ndarray:
  path = codebooks_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no codebooks at {path}; run the 'encode' stage first")
  with np.load(path, allow_pickle=False) as data:
    return data["codebooks"]


@dataclasses.dataclass(frozen=True, eq=False)
class SpeechTokenSource:
  """Token frames of a split as a random-access source: ``get`` returns a dict batch
  (``codes [n, L, D]``, ``valid_positions [n, L]``, ``text [n, S]``) where image sources
  return images, and constant labels."""
  name: str
  codes: np.ndarray  # int32 [N, L, D]
  valid: np.ndarray  # bool [N, L]
  text: np.ndarray  # int32 [N, S]
  num_classes: int = SPEECH_CLASSES

  @property
  def num_examples(self) -> int:
    return int(self.codes.shape[0])

  def get(self, indices: np.ndarray):
    indices = np.asarray(indices)
    return ({"codes": self.codes[indices], "valid_positions": self.valid[indices],
             "text": self.text[indices]}, np.zeros(len(indices), np.int32))


def speech_token_source(config, workdir: str, split: str, num_positions: int,
                        tokenizer) -> SpeechTokenSource:
  """A split's cached tokens fitted to the generator: utterances longer than
  ``num_positions`` frames or ``text.max_length`` text tokens are left out (logged)."""
  tokens = load_speech_tokens(workdir, split)
  keep, texts = [], []
  for i, (length, text) in enumerate(zip(tokens["lengths"], tokens["texts"])):
    ids = tokenizer.encode(str(text))
    if length <= num_positions and len(ids) <= config.text.max_length:
      keep.append(i)
      texts.append(ids)
  if len(keep) < len(tokens["lengths"]):
    logging.warning("%s: %d of %d utterances are longer than the generator's %d frames or "
                    "%d text tokens and are left out", split, len(tokens["lengths"]) - len(keep),
                    len(tokens["lengths"]), num_positions, config.text.max_length)
  if not keep:
    raise ValueError(f"no {split} utterance fits the generator ({num_positions} frames, "
                     f"{config.text.max_length} text tokens)")
  codes = np.zeros((len(keep), num_positions, tokens["codes"].shape[-1]), np.int32)
  width = min(num_positions, tokens["codes"].shape[1])
  codes[:, :width] = tokens["codes"][keep, :width]
  valid = np.arange(num_positions) < tokens["lengths"][keep][:, None]
  text = np.zeros((len(keep), config.text.max_length), np.int32)
  for row, ids in enumerate(texts):
    text[row, :len(ids)] = ids
  return SpeechTokenSource(f"tokens/{split}", codes, valid, text)


def flat_batch(batch: dict) -> dict:
  """A pipeline batch over a :class:`SpeechTokenSource` -> the generator's batch."""
  out = dict(batch["image"], label=batch["label"])
  if "valid" in batch:
    out["valid"] = batch["valid"]
  return out


class SpeechTokenBatches:
  """Shuffled, resumable per-process generator batches of a :class:`SpeechTokenSource`
  (the image pipeline's :class:`TrainIterator` order)."""

  def __init__(self, source: SpeechTokenSource, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self._batches = data_pipeline.TrainIterator(source, global_batch_size, seed,
                                                process_index, process_count)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return flat_batch(next(self._batches))

  def get_state(self) -> dict:
    return self._batches.get_state()

  def set_state(self, state: dict) -> None:
    self._batches.set_state(state)
