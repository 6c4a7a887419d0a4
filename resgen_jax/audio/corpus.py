"""Speech corpora for text-to-speech: utterances of (speaker, transcript, wave).

:func:`load_utterances` reads one split of the corpus ``data.name`` names:

* ``espeak`` (the default; embedded, no download): a closed-vocabulary, multi-speaker corpus
  synthesised on the fly by eSpeak NG (:mod:`resgen_jax.audio.espeak`). Sentences of words
  drawn from :data:`VOCABULARY`, spoken by eSpeak voices; training and evaluation use
  disjoint voices, so evaluation speakers are unseen (zero-shot).
* ``manifest``: a user's TSV file of ``audio_path<TAB>speaker<TAB>text`` lines pointing at
  16-bit PCM WAV files (see :func:`read_manifest`).
* ``librispeech``: TensorFlow Datasets' ``librispeech`` (16 kHz read English speech); the split
  name is passed to TFDS ("train_clean100", "test_clean", ...).

Every clip is resampled to ``audio.sample_rate``, loudness-normalised to
``audio.target_loudness_db`` and kept only if its duration lies in ``[data.min_seconds,
data.max_seconds]``; transcripts are normalised by :func:`text.normalize_text`. The order of
the utterances is deterministic. TensorFlow is imported only by ``librispeech``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import zlib
from typing import Iterable, Iterator, List, Sequence, Tuple

import ml_collections
import numpy as np

from resgen_jax.audio import espeak
from resgen_jax.audio import frontend
from resgen_jax.audio import text as text_lib
from resgen_jax.utils import files

SPEECH_SOURCES = ("espeak", "manifest", "librispeech")

# The words of the espeak corpus: short, common, lower-case, no two alike in sound
# (no "two" / "to", "four" / "for", "right" / "write"), so a word classifier can tell them
# apart. Their order gives the class ids of word_ids.
VOCABULARY = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "cat", "dog", "bird", "fish", "red", "blue", "green", "yellow", "big", "small",
    "hot", "cold", "happy", "house", "tree", "water", "music", "open", "light", "morning",
)
_WORD_IDS = {word: i for i, word in enumerate(VOCABULARY)}
# Each espeak utterance is spoken at words_per_minute times a factor drawn uniformly from
# [1 - RATE_JITTER, 1 + RATE_JITTER], so durations vary beyond the word count.
RATE_JITTER = 0.1
# Every espeak utterance uses its voice's own pitch (espeakPITCH 50): the voice variants,
# not per-utterance pitch shifts, set the speakers apart.
ESPEAK_PITCH = 50
# Utterances synthesised per fresh load of eSpeak (espeak.synthesize_many): a load (about
# 3 ms) costs more than a typical utterance (about 2 ms), and utterance i depends only on the
# requests from the start of its batch of ESPEAK_BATCH (fixed from index 0, so the first n
# utterances of a split are the same whatever the requested count). Bounds the 22.05 kHz
# waves held before resampling.
ESPEAK_BATCH = 100
# The optional header line of a manifest (its columns).
MANIFEST_COLUMNS = ("path", "speaker", "text")
# Lines of a manifest starting with this are comments.
MANIFEST_COMMENT = "#"
# LibriSpeech is 16 kHz; used when the TFDS feature does not say.
LIBRISPEECH_SAMPLE_RATE = 16000
# Integer samples (LibriSpeech's int16, or int64 in older TFDS) stand for s / 32768.
PCM16_SCALE = 32768.0


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays
class Utterance:
  """One spoken sentence.

  Attributes:
    uid: unique id within its split.
    speaker: speaker id.
    text: normalised transcript (:func:`text.normalize_text`).
    wave: float32 ``[T]`` mono at ``audio.sample_rate``, loudness-normalised.
  """

  uid: str
  speaker: str
  text: str
  wave: np.ndarray


def speech_data_config() -> ml_collections.ConfigDict:
  """The ``data`` section of the TTS pipeline (the embedded espeak corpus by default)."""
  return ml_collections.ConfigDict(dict(
      name="espeak",  # espeak | manifest | librispeech
      path="",  # manifest TSV of the train split (manifest only)
      eval_path="",  # manifest TSV of the other splits (default: path)
      data_dir=None,  # TFDS data_dir (librispeech)
      download=False,  # let TFDS download and prepare librispeech (never at test time)
      train_split="train",  # split names; librispeech passes them to TFDS, e.g.
      eval_split="test",  # "train_clean100" and "test_clean"
      min_seconds=0.5,  # clips shorter than this are dropped (after resampling)
      max_seconds=20.0,  # clips longer than this are dropped
      # librispeech: read at most this many per split; 0 = all (train_clean100 holds 28.5k
      # utterances, 100 h: about 23 GB as float32 at 16 kHz)
      max_utterances=0,
      espeak=dict(  # the synthesised corpus (name="espeak")
          # training speakers: eSpeak voices ("language+variant")
          train_voices=("en+m1", "en+m3", "en+f2", "en+f4", "en-us+m2", "en-us+f1"),
          eval_voices=("en+m5", "en+f5"),  # unseen speakers of every other split
          train_utterances=2000,  # utterances of the train split (cycling through voices)
          eval_utterances=200,  # utterances of every other split
          min_words=2,  # words per sentence, drawn uniformly from [min_words, max_words]
          max_words=8,
          words_per_minute=160,  # speaking rate before the per-utterance +-10% jitter
          seed=0,  # sentences and rates (each split name has its own stream)
      ),
  ))


# --------------------------------------------------------------------------------------
# Shared post-processing


def prepare_wave(wave: np.ndarray, sample_rate: int, audio_cfg: ml_collections.ConfigDict,
                 where: str) -> np.ndarray:
  """A clip -> float32 ``[T']`` at ``audio.sample_rate``, loudness-normalised.

  A ValueError from the front end (e.g. a silent clip) is re-raised prefixed by ``where``.
  """
  try:
    wave = frontend.resample(wave, sample_rate, audio_cfg.sample_rate)
    return frontend.normalize_loudness(wave, audio_cfg.target_loudness_db)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def check_duration_limits(data_cfg: ml_collections.ConfigDict) -> None:
  if not 0.0 <= data_cfg.min_seconds <= data_cfg.max_seconds:
    raise ValueError(f"data.min_seconds ({data_cfg.min_seconds}) and data.max_seconds "
                     f"({data_cfg.max_seconds}) must satisfy 0 <= min_seconds <= max_seconds")


def filter_durations(utterances: Sequence[Utterance], data_cfg: ml_collections.ConfigDict,
                     audio_cfg: ml_collections.ConfigDict, split: str) -> List[Utterance]:
  """The utterances lasting ``[min_seconds, max_seconds]``; logs how many were dropped."""
  low, high = data_cfg.min_seconds, data_cfg.max_seconds
  kept = [u for u in utterances if low <= u.wave.size / audio_cfg.sample_rate <= high]
  dropped = len(utterances) - len(kept)
  if dropped:
    logging.info("%s/%s: dropped %d of %d utterances outside [%g, %g] s", data_cfg.name,
                 split, dropped, len(utterances), low, high)
  if not kept:
    raise ValueError(f"{data_cfg.name} split {split!r}: none of its {len(utterances)} "
                     f"utterances lasts between data.min_seconds = {low} and "
                     f"data.max_seconds = {high} s")
  return kept


def check_unique_uids(utterances: Sequence[Utterance], where: str) -> None:
  seen = set()
  for u in utterances:
    if u.uid in seen:
      raise ValueError(f"{where}: the utterance id {u.uid!r} occurs more than once")
    seen.add(u.uid)


# --------------------------------------------------------------------------------------
# espeak: synthesised on the fly


def vocabulary() -> Tuple[str, ...]:
  """The words of the espeak corpus; a word's index is its class id (see :func:`word_ids`)."""
  return VOCABULARY


def word_ids(transcript: str) -> np.ndarray:
  """An espeak-corpus transcript -> int32 ``[n_words]`` indices into :data:`VOCABULARY`.

  Raises a ValueError naming a word outside the vocabulary.
  """
  words = text_lib.normalize_text(transcript).split()
  unknown = [w for w in words if w not in _WORD_IDS]
  if unknown or not words:
    raise ValueError(f"{transcript!r} is not a sentence of the espeak vocabulary "
                     f"(unknown words: {unknown})")
  return np.asarray([_WORD_IDS[w] for w in words], np.int32)


def split_stream(split: str) -> int:
  """A stable integer per split name (unlike hash(), the same in every process)."""
  return zlib.crc32(split.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class EspeakScript:
  """What one espeak utterance says and how: the draws behind it, before synthesis."""

  uid: str
  voice: str
  text: str
  words_per_minute: int


def espeak_scripts(data_cfg: ml_collections.ConfigDict, split: str) -> List[EspeakScript]:
  """The sentences, voices and rates of an espeak split (cheap: nothing is synthesised).

  Utterance ``i`` is spoken by voice ``i % len(voices)``; its word count, words and rate
  factor are drawn in turn from one generator seeded by ``(seed, split)``, so the first
  ``n`` utterances are the same whatever the requested count.
  """
  cfg = data_cfg.espeak
  train = split == data_cfg.train_split
  voices = tuple(cfg.train_voices if train else cfg.eval_voices)
  count = cfg.train_utterances if train else cfg.eval_utterances
  kind = "train_voices" if train else "eval_voices"
  if not voices:
    raise ValueError(f"data.espeak.{kind} is empty; name eSpeak voices such as 'en+m1'")
  if count < 1:
    raise ValueError(f"data.espeak.{'train' if train else 'eval'}_utterances must be >= 1, "
                     f"got {count}")
  if not 1 <= cfg.min_words <= cfg.max_words:
    raise ValueError(f"data.espeak.min_words ({cfg.min_words}) and max_words "
                     f"({cfg.max_words}) must satisfy 1 <= min_words <= max_words")
  rng = np.random.default_rng([cfg.seed, split_stream(split)])
  scripts = []
  for i in range(count):
    num_words = int(rng.integers(cfg.min_words, cfg.max_words + 1))
    words = [VOCABULARY[k] for k in rng.integers(0, len(VOCABULARY), num_words)]
    factor = rng.uniform(1.0 - RATE_JITTER, 1.0 + RATE_JITTER)
    scripts.append(EspeakScript(
        uid=f"{split}_{i:05d}", voice=voices[i % len(voices)], text=" ".join(words),
        words_per_minute=int(round(cfg.words_per_minute * factor))))
  return scripts


def load_espeak(data_cfg: ml_collections.ConfigDict, audio_cfg: ml_collections.ConfigDict,
                split: str) -> List[Utterance]:
  scripts = espeak_scripts(data_cfg, split)
  utterances = []
  for start in range(0, len(scripts), ESPEAK_BATCH):
    batch = scripts[start:start + ESPEAK_BATCH]
    waves, rate = espeak.synthesize_many([
        espeak.Request(s.text, s.voice, s.words_per_minute, ESPEAK_PITCH) for s in batch])
    for script, wave in zip(batch, waves):
      where = f"espeak/{split} utterance {script.uid} ({script.voice}: {script.text!r})"
      utterances.append(Utterance(uid=script.uid, speaker=script.voice,
                                  text=text_lib.normalize_text(script.text),
                                  wave=prepare_wave(wave, rate, audio_cfg, where)))
  return utterances


# --------------------------------------------------------------------------------------
# manifest: a user's TSV of WAV files


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  """One line of a manifest.

  Attributes:
    audio_path: the WAV file (absolute when the manifest is given by an absolute path).
    uid: the audio path relative to the manifest's folder, without its extension.
    speaker: speaker id.
    text: the transcript as written.
    line: 1-based line number in the manifest.
  """

  audio_path: str
  uid: str
  speaker: str
  text: str
  line: int


def tsv_lines(path: str, kind: str) -> Iterator[Tuple[int, str]]:
  """``(line number, line)`` of a UTF-8 text file's lines (1-based), without blank lines
  and ``#`` comments. FileNotFoundError naming the ``kind`` of file when it is missing; a
  ValueError naming ``path:line`` for a line that is not UTF-8."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the {kind} {path} does not exist")
  with open(path, "rb") as f:
    raw_lines = f.read().split(b"\n")
  for number, raw in enumerate(raw_lines, start=1):
    try:
      line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}:{number}: not valid UTF-8 ({e})") from e
    if line.strip() and not line.startswith(MANIFEST_COMMENT):
      yield number, line


def read_manifest(path: str) -> List[ManifestEntry]:
  """Parses a manifest: UTF-8 lines ``audio_path<TAB>speaker<TAB>text``.

  Blank lines and lines starting with ``#`` are skipped, and so is a first line
  ``path<TAB>speaker<TAB>text``. Relative audio paths are relative to the manifest's folder.
  The WAV files are not read here.

  Raises:
    FileNotFoundError: no manifest at ``path``.
    ValueError: naming ``path:line`` for a line that is not valid UTF-8, has other than 3
      columns, or an empty path, speaker or (normalised) text; for a repeated utterance id,
      and for a manifest without entries.
  """
  root = os.path.dirname(path)
  entries, first_uid_line = [], {}
  header_allowed = True
  for number, line in tsv_lines(path, "manifest"):
    where = f"{path}:{number}"
    columns = line.split("\t")
    if header_allowed and tuple(c.strip() for c in columns) == MANIFEST_COLUMNS:
      header_allowed = False
      continue
    header_allowed = False
    if len(columns) != len(MANIFEST_COLUMNS):
      raise ValueError(f"{where}: expected {len(MANIFEST_COLUMNS)} tab-separated columns "
                       f"(audio_path, speaker, text), got {len(columns)}: {line!r}")
    audio, speaker, transcript = (c.strip() for c in columns)
    for name, value in (("audio path", audio), ("speaker", speaker)):
      if not value:
        raise ValueError(f"{where}: the {name} is empty")
    if not text_lib.normalize_text(transcript):
      raise ValueError(f"{where}: the text of {audio} is empty")
    audio_path = os.path.normpath(os.path.join(root, audio))
    uid = os.path.splitext(os.path.relpath(audio_path, root or os.curdir))[0]
    uid = uid.replace(os.sep, "/")
    if uid in first_uid_line:
      raise ValueError(f"{where}: the utterance id {uid!r} (from {audio}) repeats line "
                       f"{first_uid_line[uid]}")
    first_uid_line[uid] = number
    entries.append(ManifestEntry(audio_path=audio_path, uid=uid, speaker=speaker,
                                 text=transcript, line=number))
  if not entries:
    raise ValueError(f"the manifest {path} lists no utterances (expected lines "
                     "audio_path<TAB>speaker<TAB>text)")
  return entries


def write_manifest(path: str, rows: Iterable[Tuple[str, str, str]]) -> None:
  """Writes ``(audio_path, speaker, text)`` rows as a manifest with a header, atomically.

  Raises a ValueError for a row whose fields are not three, are empty, or hold a tab or a
  line break (it could not be read back).
  """
  lines = ["\t".join(MANIFEST_COLUMNS)]
  for i, row in enumerate(rows):
    row = tuple(row)
    if len(row) != len(MANIFEST_COLUMNS):
      raise ValueError(f"manifest row {i} must be (audio_path, speaker, text), got {row!r}")
    for name, value in zip(MANIFEST_COLUMNS, row):
      if not isinstance(value, str) or not value.strip() or any(c in value for c in "\t\r\n"):
        raise ValueError(f"manifest row {i}: the {name} must be a non-empty str without "
                         f"tabs or line breaks, got {value!r}")
    lines.append("\t".join(row))
  with files.atomic_write(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
      f.write("\n".join(lines) + "\n")


def manifest_path(data_cfg: ml_collections.ConfigDict, split: str) -> str:
  """``data.path`` for the train split, else ``data.eval_path`` or ``data.path``."""
  if not data_cfg.path:
    raise ValueError("data.name='manifest' needs --config.data.path (a TSV of "
                     "audio_path<TAB>speaker<TAB>text lines)")
  if split == data_cfg.train_split:
    return data_cfg.path
  return data_cfg.get("eval_path") or data_cfg.path


def load_manifest(data_cfg: ml_collections.ConfigDict, audio_cfg: ml_collections.ConfigDict,
                  split: str) -> List[Utterance]:
  path = manifest_path(data_cfg, split)
  utterances = []
  for entry in read_manifest(path):
    where = f"{path}:{entry.line}"
    try:
      wave, rate = frontend.read_wav(entry.audio_path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{where}: {e}") from e
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
    except (RuntimeError, EOFError, struct.error) as e:
      # Python's wave module raises these (RuntimeError without a message) for some garbled
      # chunk headers, which frontend.read_wav lets through.
      raise ValueError(f"{where}: {entry.audio_path!r} is not a readable PCM WAV file "
                       f"({type(e).__name__}: {e})") from e
    utterances.append(Utterance(uid=entry.uid, speaker=entry.speaker,
                                text=text_lib.normalize_text(entry.text),
                                wave=prepare_wave(wave, rate, audio_cfg, where)))
  return utterances


# --------------------------------------------------------------------------------------
# librispeech: TensorFlow Datasets


def pcm_to_float(samples: np.ndarray, where: str) -> np.ndarray:
  """Integer PCM (int16 range) or float samples ``[T]`` -> float32 ``[T]`` in [-1, 1]."""
  samples = np.asarray(samples)
  if np.issubdtype(samples.dtype, np.floating):
    return samples.astype(np.float32)
  if samples.size and (samples.min() < -PCM16_SCALE or samples.max() >= PCM16_SCALE):
    raise ValueError(f"{where}: integer samples must be 16-bit PCM, got values from "
                     f"{samples.min()} to {samples.max()}")
  return samples.astype(np.float32) / np.float32(PCM16_SCALE)


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_librispeech(data_cfg: ml_collections.ConfigDict, audio_cfg: ml_collections.ConfigDict,
                     split: str) -> List[Utterance]:
  from resgen_jax.data import sources  # pylint: disable=g-import-not-at-top  # imports PIL
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import
  builder = sources.tfds_builder(data_cfg)  # imports TF with GPUs hidden; checks prepared
  if data_cfg.max_utterances < 0:
    raise ValueError(f"data.max_utterances must be >= 0 (0 = all), got "
                     f"{data_cfg.max_utterances}")
  feature = builder.info.features["speech"]
  rate = int(getattr(feature, "sample_rate", None) or LIBRISPEECH_SAMPLE_RATE)
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  if data_cfg.max_utterances:
    dataset = dataset.take(data_cfg.max_utterances)
  utterances = []
  for example in tfds.as_numpy(dataset):
    uid = _as_str(example["id"])
    where = f"librispeech/{split} utterance {uid}"
    transcript = text_lib.normalize_text(_as_str(example["text"]))
    if not transcript:
      raise ValueError(f"{where}: the transcript is empty")
    wave = pcm_to_float(example["speech"], where)
    utterances.append(Utterance(uid=uid, speaker=str(int(example["speaker_id"])),
                                text=transcript,
                                wave=prepare_wave(wave, rate, audio_cfg, where)))
  return utterances


# --------------------------------------------------------------------------------------


def load_utterances(data_cfg: ml_collections.ConfigDict, audio_cfg: ml_collections.ConfigDict,
                    split: str) -> List[Utterance]:
  """The utterances of ``split`` of the corpus ``data.name`` names, in a fixed order.

  Args:
    data_cfg: the ``data`` section (see :func:`speech_data_config`).
    audio_cfg: the ``audio`` section (:func:`frontend.audio_config`): sample rate and
      loudness target.
    split: a split name; for espeak and manifest, ``data.train_split`` is the training
      split and any other name an evaluation split.

  Returns:
    The utterances lasting ``[data.min_seconds, data.max_seconds]``.

  Raises:
    ValueError: an unknown ``data.name``, bad input (naming the file, line or utterance), or
      no utterance left after the duration filter.
  """
  loaders = {"espeak": load_espeak, "manifest": load_manifest,
             "librispeech": load_librispeech}
  if data_cfg.name not in loaders:
    raise ValueError(f"unknown speech data.name {data_cfg.name!r}; valid names are "
                     f"{SPEECH_SOURCES}")
  check_duration_limits(data_cfg)
  utterances = loaders[data_cfg.name](data_cfg, audio_cfg, split)
  check_unique_uids(utterances, f"{data_cfg.name}/{split}")
  return filter_durations(utterances, data_cfg, audio_cfg, split)
