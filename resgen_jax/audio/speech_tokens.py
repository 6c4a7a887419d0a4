"""The speech token cache and the generator's data over it.

The ``encode`` stage (:func:`resgen_jax.audio.tts.run_encode`) writes the image runs' cache
format (``resgen_jax.codec.token_cache``) under ``DIR/tokens``: chunks of sequential batches
of utterances, each process its rows (encoding is sharded over the mesh and resumes after
the last complete chunk), every row an utterance:

* ``codes`` ``[n, L_max, D]``: its token frames, zero past its length (``L_max``: the
  split's longest utterance);
* ``lengths``, ``texts``, ``speakers``, ``uids`` and ``index`` (its place in the split, by
  which :func:`load_speech_tokens` restores the split's order);

then ``codebooks.npz`` (``[D, K, d]``) and last ``meta.json`` (:func:`cache_meta`: codec,
front end, corpus, process count). Caches of the old layout (one ``speech_<split>.npz`` per
split, written by process 0) are still read.

:func:`speech_token_source` fits a split to the generator (frames, text tokens) as a
random-access source; ``token_cache.TokenBatches`` draws its shuffled, resumable
per-process batches (through :func:`flat_batch`) as it does the images'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

import jax
import numpy as np

from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import corpus
from resgen_jax.codec import token_cache

TOKENS_DIR = token_cache.TOKENS_DIR
SPEECH_META = {"kind": "speech"}  # marks a token cache of speech utterances
SPEECH_CLASSES = 1  # the generator's class input is constant for speech (plus the null class)


def legacy_path(workdir: str, split: str) -> str:
  """A split's one file in caches written before the shared chunk format."""
  return os.path.join(workdir, TOKENS_DIR, f"speech_{split}.npz")


def codebooks_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, token_cache.CODEBOOKS_FILE)


def meta_path(workdir: str) -> str:
  return token_cache.meta_path(workdir)


def cache_meta(config, codec: codec_lib.SpeechCodec, tokenizer_step: int) -> dict:
  """What the token cache of a run's utterances depends on (``meta.json``, as JSON reads
  it back): the codec, its step, the front end, the corpus (where it lives does not count)
  and the process count that writes the chunks."""
  corpus_fields = {k: v for k, v in config.data.to_dict().items()
                   if k not in ("data_dir", "download")}
  return json.loads(json.dumps(dict(
      SPEECH_META, depth=codec.depth, codebook_size=codec.codebook_size,
      downsample=codec.downsample, tokenizer_step=int(tokenizer_step),
      audio=config.audio.to_dict(), corpus=corpus_fields, process_count=jax.process_count())))


def _saved_meta(workdir: str):
  if not os.path.exists(meta_path(workdir)):
    return None
  with open(meta_path(workdir)) as f:
    return json.load(f)


def is_legacy(saved) -> bool:
  """Whether a ``meta.json`` is that of a cache from before the chunk format (one file per
  split by process 0, no process count; the corpus under ``data``)."""
  return saved is not None and "process_count" not in saved


def legacy_cached(workdir: str, splits: Sequence[str], meta: dict) -> bool:
  """True when ``DIR/tokens`` holds a complete cache of the old layout made under ``meta``
  (it is read as it is, not encoded again); a ValueError when it holds one of another codec
  or corpus."""
  saved = _saved_meta(workdir)
  if not is_legacy(saved):
    return False
  old = {k: v for k, v in meta.items() if k not in ("process_count", "corpus")}
  if saved != dict(old, data=meta["corpus"]):
    raise ValueError(f"{meta_path(workdir)} describes tokens of another codec or corpus; "
                     f"remove {os.path.dirname(meta_path(workdir))} to encode again")
  return all(os.path.exists(legacy_path(workdir, s)) for s in splits)


def utterance_batches(log_mels: Sequence[np.ndarray], global_batch: int, frames: int,
                      audio_cfg, start: int, process_index: int, process_count: int):
  """This process's rows of the split's sequential batches of ``global_batch`` utterances,
  from batch ``start``: ``mel`` ``[B/P, frames, n_mels]`` (each utterance followed by
  silence; rows past the split's end silent), ``valid`` ``[B/P]`` and ``index`` ``[B/P]``,
  the utterance's place in the split."""
  local = global_batch // process_count
  quiet = codec_lib.pad_frames(log_mels[0][:0], frames, audio_cfg)
  for first in range(start * global_batch, len(log_mels), global_batch):
    index = first + process_index * local + np.arange(local)
    valid = index < len(log_mels)
    mel = np.stack([codec_lib.pad_frames(log_mels[i], frames, audio_cfg) if ok else quiet
                    for i, ok in zip(index, valid)])
    yield {"mel": mel, "valid": valid, "index": np.where(valid, index, 0)}


def utterance_rows(codes: np.ndarray, index: np.ndarray, utterances: Sequence[corpus.Utterance],
                   lengths: Sequence[int]) -> dict:
  """The cache's rows of encoded utterances: ``codes`` ``[n, L, D]`` zeroed past each
  utterance's ``lengths[index]`` frames, with those lengths, the texts, speakers, ids and
  the place in the split (``index``)."""
  length = np.asarray([lengths[i] for i in index], np.int32)
  codes = np.where(np.arange(codes.shape[1])[None, :, None] < length[:, None, None], codes, 0)
  return {"codes": codes, "lengths": length, "index": np.asarray(index, np.int64),
          "texts": np.asarray([utterances[i].text for i in index]),
          "speakers": np.asarray([utterances[i].speaker for i in index]),
          "uids": np.asarray([utterances[i].uid for i in index])}


def load_speech_tokens(workdir: str, split: str) -> dict:
  """A split's cached utterances in the split's order: ``codes`` int ``[N, L_max, D]`` (zero
  past each length), ``lengths``, ``texts``, ``speakers``, ``uids``. Reads the chunks every
  process wrote (``token_cache``), or a cache of the old one-file layout."""
  if is_legacy(_saved_meta(workdir)):
    path = legacy_path(workdir, split)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no speech tokens at {path}; run the 'encode' stage first")
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  fields = token_cache.load_fields(workdir, split)
  order = np.argsort(fields.pop("index"), kind="stable")
  return {k: v[order] for k, v in fields.items()}


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
