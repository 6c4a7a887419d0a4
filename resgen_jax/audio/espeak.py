"""eSpeak NG through ctypes: deterministic speech synthesis and IPA phonemes (host side).

The library and its data come from the ``espeakng-loader`` package
(``espeakng_loader.get_library_path()`` / ``get_data_path()``); nothing is downloaded.

eSpeak keeps its state in C globals, so every call holds :data:`_LOCK` (threads take turns)
and a process has at most one copy of the library loaded. Part of that state is beyond
reach of its API and survives ``espeak_Terminate``: the pitch-flutter phase (a static inside
the wave generator), its automatic gain and its voicing-cycle counter. They carry over
from one utterance into the next, so with one library loaded for good, synthesising the
same text twice gives two waves that differ in every sample after the first few ms, and in
length. To be deterministic, :func:`synthesize` and :func:`synthesize_many` unload the
library (``dlclose``) and load a fresh copy, whose static data start from the values on
disk, at the start of each call (about 3 ms, mostly eSpeak listing its voice files), and
seed eSpeak's breath-noise generator (otherwise seeded from the clock) with
:data:`NOISE_SEED` before each utterance. A wave then depends only on the call's
arguments: not on earlier calls, the thread, or the process. Phonemisation does not depend
on that state, so :func:`phonemize` reuses the loaded library (about 0.1 ms a call).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

# espeak_AUDIO_OUTPUT: synthesise into memory and hand the samples to the synth callback in
# the calling thread (no audio device, no background thread).
AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_PARAMETER ids of espeak_SetParameter.
PARAM_RATE, PARAM_PITCH = 1, 3
# The text given to espeak_Synth / espeak_TextToPhonemes is UTF-8 (espeakCHARS_UTF8): Python
# encodes it so, and eSpeak's auto-detection could read other bytes as ISO-8859-1.
CHARS_UTF8 = 1
# phonememode of espeak_TextToPhonemes: bit 1 set = IPA as UTF-8 (not eSpeak's ASCII names);
# no separator between the phonemes of a word, words separated by a space.
PHONEMES_IPA = 0x02
# espeak_ERROR of a call that succeeded (EE_OK).
EE_OK = 0
# Speaking rates espeak accepts (espeakRATE_MINIMUM, espeakRATE_MAXIMUM): it silently
# clamps others, so they are refused instead.
MIN_WORDS_PER_MINUTE, MAX_WORDS_PER_MINUTE = 80, 450
# Base pitch range of espeakPITCH (50 is the voice's own pitch).
MIN_PITCH, MAX_PITCH = 0, 100
# Seed of eSpeak's breath-noise generator (voice variants with "breath", e.g. en+f2, en+f5),
# which espeak_Initialize seeds from the clock.
NOISE_SEED = 0
# The voice whose letter-to-sound rules phonemize uses: General American English.
PHONEMIZE_VOICE = "en-us"
# Voice variants ("en+f3": language "en", variant "f3") live in this folder of the data path;
# eSpeak accepts an unknown variant silently (the plain voice), so it is checked here.
VARIANTS_DIR = os.path.join("voices", "!v")
# Output samples are 16-bit PCM: s stands for s / 32768 in [-1, 1).
PCM16_SCALE = 32768.0

# synth callback: int (short *wav, int numsamples, espeak_EVENT *events); 0 = continue.
SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.c_void_p)

# Held for every use of the library and of the module state below.
_LOCK = threading.Lock()
_library: Optional[ctypes.CDLL] = None  # the loaded, initialised library, if any
_sample_rate = 0  # what espeak_Initialize returned for it
_chunks: List[np.ndarray] = []  # int16 chunks of the utterance being synthesised
_warned_resident = False  # warned once that dlclose left the library loaded


def library_paths() -> Tuple[str, str]:
  """(the libespeak-ng shared library, its espeak-ng-data folder), from espeakng-loader."""
  try:
    import espeakng_loader  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("eSpeak NG is unavailable: the Python package espeakng-loader, which "
                       "ships libespeak-ng and its data, is not installed; run `pip install "
                       "espeakng-loader`") from e
  return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


@SYNTH_CALLBACK
def _collect(wav, num_samples, _):
  """Appends a chunk of synthesised int16 samples to ``_chunks`` (under ``_LOCK``)."""
  if wav and num_samples > 0:
    _chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
  return 0


def _declare(lib: ctypes.CDLL) -> None:
  """Sets the C signatures of the functions used: by default ctypes passes and returns C
  ints, wrong for size_t, long and char * on 64-bit platforms."""
  lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
  lib.espeak_Initialize.restype = ctypes.c_int
  lib.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
  lib.espeak_SetSynthCallback.restype = None
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetVoiceByName.restype = ctypes.c_int
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  lib.espeak_SetParameter.restype = ctypes.c_int
  lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
  lib.espeak_ng_SetRandSeed.restype = None
  lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                               ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
  lib.espeak_Synth.restype = ctypes.c_int
  lib.espeak_Synchronize.argtypes = []
  lib.espeak_Synchronize.restype = ctypes.c_int
  lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                        ctypes.c_int]
  lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
  lib.espeak_Terminate.argtypes = []
  lib.espeak_Terminate.restype = ctypes.c_int


def _unload() -> None:
  """Terminates and unloads the library, so that the next load starts from a clean state."""
  global _library, _warned_resident
  if _library is None:
    return
  lib, _library = _library, None
  lib.espeak_Terminate()
  path = lib._name  # pylint: disable=protected-access
  import _ctypes  # pylint: disable=g-import-not-at-top
  _ctypes.dlclose(lib._handle)  # pylint: disable=protected-access
  try:  # still mapped? then someone else in the process holds it open too
    resident = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
  except OSError:
    return
  _ctypes.dlclose(resident._handle)  # pylint: disable=protected-access
  if not _warned_resident:
    _warned_resident = True
    logging.warning(
        "%s stays loaded after dlclose: another part of this process holds it open, so "
        "eSpeak's synthesis state carries over between utterances and synthesize() is no "
        "longer bit-exact across calls", path)


def _load() -> ctypes.CDLL:
  """Loads and initialises the library if it is not loaded (caller holds ``_LOCK``)."""
  global _library, _sample_rate
  if _library is not None:
    return _library
  import _ctypes  # pylint: disable=g-import-not-at-top
  lib_path, data_path = library_paths()
  try:
    lib = ctypes.CDLL(lib_path)
  except OSError as e:
    raise RuntimeError(f"cannot load the eSpeak NG library {lib_path} (from "
                       f"espeakng-loader): {e}") from e
  try:
    _declare(lib)
  except AttributeError as e:
    _ctypes.dlclose(lib._handle)  # pylint: disable=protected-access
    raise RuntimeError(f"the eSpeak NG library {lib_path} lacks a function this module "
                       f"needs (eSpeak NG >= 1.52 has them all): {e}") from e
  rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
  if rate <= 0:
    _ctypes.dlclose(lib._handle)  # pylint: disable=protected-access
    raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with the data folder "
                       f"{data_path}; reinstall espeakng-loader")
  lib.espeak_SetSynthCallback(_collect)
  _library, _sample_rate = lib, rate
  return lib


@contextlib.contextmanager
def _session(fresh: bool) -> Iterator[ctypes.CDLL]:
  """Holds ``_LOCK`` and yields the initialised library: a freshly loaded copy if ``fresh``."""
  with _LOCK:
    if fresh:
      _unload()
    yield _load()


def _encode_text(text: str, what: str) -> bytes:
  if not isinstance(text, str):
    raise TypeError(f"{what} takes a str, got {type(text).__name__}")
  if not text.strip():
    raise ValueError(f"{what}: the text is empty")
  if "\0" in text:
    raise ValueError(f"{what}: the text {text!r} holds a NUL character")
  return text.encode("utf-8")


@functools.lru_cache(maxsize=None)
def variant_names() -> Tuple[str, ...]:
  """The voice variants ("m1", "f3", "klatt", ...) a voice name may add after a ``+``."""
  return tuple(sorted(os.listdir(os.path.join(library_paths()[1], VARIANTS_DIR))))


def _check_voice(voice: str) -> bytes:
  if not isinstance(voice, str) or not voice.strip():
    raise ValueError(f"the eSpeak voice name must be a non-empty str, got {voice!r}")
  variant = voice.partition("+")[2]
  if variant and variant not in variant_names():
    raise ValueError(f"unknown eSpeak voice {voice!r}: there is no variant {variant!r}; "
                     f"variants are e.g. m1..m7, f1..f5 (see espeak.variant_names())")
  return voice.encode("utf-8")


def _set_voice(lib: ctypes.CDLL, voice: str) -> None:
  status = lib.espeak_SetVoiceByName(_check_voice(voice))
  if status != EE_OK:
    raise ValueError(f"unknown eSpeak voice {voice!r} (espeak_SetVoiceByName returned "
                     f"{status}); voices are languages such as 'en', 'en-us', 'en-gb-x-rp', "
                     "optionally with a variant: 'en+f3'")


class Request(NamedTuple):
  """One utterance for :func:`synthesize_many` (the arguments of :func:`synthesize`)."""

  text: str
  voice: str
  words_per_minute: int
  pitch: int


def _check_request(request: Request) -> bytes:
  """Validates a request (but its voice) -> its UTF-8 text."""
  data = _encode_text(request.text, "synthesize")
  for name, low, high in (("words_per_minute", MIN_WORDS_PER_MINUTE, MAX_WORDS_PER_MINUTE),
                          ("pitch", MIN_PITCH, MAX_PITCH)):
    value = getattr(request, name)
    if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
        or not low <= value <= high):
      raise ValueError(f"synthesize {name} must be an integer in [{low}, {high}], got "
                       f"{value!r}")
  return data


def _speak(lib: ctypes.CDLL, request: Request, data: bytes) -> np.ndarray:
  """Synthesises one request with the loaded library -> float32 ``[T]`` (holds _LOCK)."""
  _set_voice(lib, request.voice)
  lib.espeak_SetParameter(PARAM_RATE, int(request.words_per_minute), 0)
  lib.espeak_SetParameter(PARAM_PITCH, int(request.pitch), 0)
  lib.espeak_ng_SetRandSeed(NOISE_SEED)
  _chunks.clear()
  try:
    status = lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, CHARS_UTF8, None, None)
    if status == EE_OK:
      status = lib.espeak_Synchronize()
    samples = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
  finally:
    _chunks.clear()
  if status != EE_OK:
    raise RuntimeError(f"espeak_Synth failed with status {status} for {request.text!r}")
  if not np.any(samples):
    raise ValueError(f"synthesize: eSpeak produced no sound for {request.text!r} (voice "
                     f"{request.voice!r})")
  return samples.astype(np.float32) / np.float32(PCM16_SCALE)


def synthesize_many(requests: Sequence[Request]) -> Tuple[List[np.ndarray], int]:
  """Speaks several utterances in turn with one freshly loaded copy of the library.

  Faster than :func:`synthesize` per utterance (the library loads once: about 1-2 ms of
  synthesis per second of speech, against about 3 ms per load), and as deterministic, but
  for the whole batch: eSpeak's inaccessible state flows from each utterance into the next,
  so utterance ``i`` depends on requests ``0..i`` (the same batch, or the same first
  ``i + 1`` requests, gives the same waves), not on anything before the call.

  Args:
    requests: what to say and how (see :func:`synthesize`).

  Returns:
    (float32 waves ``[T_i]`` in [-1, 1), one per request, their sample rate in Hz: 22050).

  Raises:
    ValueError: as :func:`synthesize`, for the first bad request.
    RuntimeError: the library cannot be loaded.
  """
  requests = [Request(*r) for r in requests]
  encoded = [_check_request(r) for r in requests]
  with _session(fresh=True) as lib:
    waves = [_speak(lib, r, data) for r, data in zip(requests, encoded)]
    return waves, _sample_rate


def synthesize(text: str, voice: str, words_per_minute: int,
               pitch: int) -> Tuple[np.ndarray, int]:
  """Speaks ``text`` with an eSpeak voice: deterministic (see the module docstring).

  Args:
    text: what to say (UTF-8 text; punctuation shapes the intonation).
    voice: an eSpeak voice name, a language optionally with a variant: "en", "en-us+f1".
    words_per_minute: speaking rate in [80, 450] (eSpeak's default is 175).
    pitch: base pitch in [0, 100]; 50 is the voice's own.

  Returns:
    (float32 wave ``[T]`` in [-1, 1), its sample rate in Hz: 22050).

  Raises:
    ValueError: empty text, an unknown voice, a rate or pitch out of range, or text that
      produces no sound.
    RuntimeError: the library cannot be loaded.
  """
  waves, rate = synthesize_many([Request(text, voice, words_per_minute, pitch)])
  return waves[0], rate


def phonemize(text: str, voice: str = PHONEMIZE_VOICE) -> str:
  """The IPA transcription eSpeak gives ``text``, its clauses joined by a space.

  Words are separated by a space; stress marks (ˈ ˌ) precede stressed syllables and ``ː``
  marks length; punctuation is dropped (it only ends clauses). Deterministic.

  Args:
    text: English text (any case).
    voice: the eSpeak voice whose pronunciation rules are used (General American).

  Returns:
    The IPA string (possibly empty, e.g. for text of punctuation only).
  """
  data = _encode_text(text, "phonemize")
  buffer = ctypes.create_string_buffer(data)
  pointer = ctypes.c_void_p(ctypes.addressof(buffer))
  end = ctypes.addressof(buffer) + len(data)
  clauses = []
  with _session(fresh=False) as lib:
    _set_voice(lib, voice)
    while pointer.value:
      before = pointer.value
      clause = lib.espeak_TextToPhonemes(ctypes.byref(pointer), CHARS_UTF8, PHONEMES_IPA)
      if clause:
        clauses.append(clause.decode("utf-8").strip())
      if pointer.value and not before < pointer.value <= end:
        raise RuntimeError(f"espeak_TextToPhonemes did not advance through {text!r}")
  return " ".join(c for c in clauses if c)
