"""Text tokenizers of text-to-speech: transcripts -> int32 symbol ids, and back.

Every transcript first goes through :func:`normalize_text`. A tokenizer maps each symbol of
its fixed inventory to an id, after two reserved ids:

* ``PAD = 0`` pads a batch to a common length (``encode_batch``);
* ``NULL = 1`` stands for "no text", the condition dropped for classifier-free guidance.

``encode`` never produces either, so ``ids != PAD`` marks the real symbols of a padded row.

* :class:`CharTokenizer`: one id per character of an alphabet (letters and punctuation).
* :class:`PhonemeTokenizer`: one id per character of eSpeak's IPA transcription
  (:func:`resgen_jax.audio.espeak.phonemize`; a phoneme such as ``aɪ`` or ``n̩`` spans two).
"""

from __future__ import annotations

import unicodedata
from typing import Dict, Protocol, Sequence

import ml_collections
import numpy as np

from resgen_jax.audio import espeak
from resgen_jax.layers import NULL_TEXT, TEXT_PAD

# Reserved ids: padding, and the "no text" condition of classifier-free guidance.
PAD, NULL = TEXT_PAD, NULL_TEXT  # the ids the generator's text encoder reads (layers.py)
# The id of a tokenizer's first symbol: the reserved ids come before it.
FIRST_SYMBOL = 2
TOKENIZERS = ("chars", "phonemes")
# Lower-case English letters, the apostrophe of contractions, the space, and the
# punctuation that shapes prosody (LibriSpeech transcripts use the first 28 only).
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz' ,.?!-"
# Every character eSpeak's English voices (en-us, used by PhonemeTokenizer, and en) put in
# phonemize's output: found by phonemizing ~5,000 varied English sentences (standard
# library docstrings) plus loanwords, names, numbers, symbols, non-Latin scripts and emoji
# (eSpeak spells out or names what it cannot read, in English phonemes). Word separator and
# prosody marks: space, primary / secondary stress, length.
PHONEME_MARKS = " ˈˌː"
# Plain Latin letters that eSpeak uses as IPA symbols ("r" is rare, from the en voice).
PHONEME_LATIN = "abdefhijklmnoprstuvwxz"
# The other IPA letters: vowels (æ ɐ ɑ ɒ ɔ ə ɚ ɛ ɜ ɪ ʊ ʌ ᵻ) and consonants (ð ŋ ɡ ɬ ɹ ɾ ʃ ʒ
# ʔ θ); "ɡ" is U+0261 (script g), not the ASCII "g".
PHONEME_IPA = "æðŋɐɑɒɔəɚɛɜɡɪɬɹɾʃʊʌʒʔθᵻ"
# Combining diacritics, tokens of their own after their letter: the tilde of nasal vowels
# (French loanwords: ɑ̃) and the syllabic mark (American "button": bˈʌʔn̩).
PHONEME_DIACRITICS = "\u0303\u0329"
PHONEME_INVENTORY = PHONEME_MARKS + PHONEME_LATIN + PHONEME_IPA + PHONEME_DIACRITICS


def normalize_text(text: str) -> str:
  """Unicode NFKC, lower case, runs of whitespace collapsed to one space, ends stripped."""
  if not isinstance(text, str):
    raise TypeError(f"normalize_text takes a str, got {type(text).__name__}")
  return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class TextTokenizer(Protocol):
  """What the TTS pipeline needs from a text tokenizer."""

  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    ...

  def encode_batch(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    ...

  def decode(self, ids) -> str:
    ...


class SymbolTokenizer:
  """Ids of the characters of a fixed symbol inventory; subclasses say what the symbols of a
  text are (:meth:`symbols`).

  Attributes:
    inventory: the symbols, in id order: ``inventory[k]`` has id ``FIRST_SYMBOL + k``.
    vocab_size: ``FIRST_SYMBOL + len(inventory)``, counting PAD and NULL.
  """

  def __init__(self, inventory: str):
    if not isinstance(inventory, str) or not inventory:
      raise ValueError(f"a tokenizer needs a non-empty str of symbols, got {inventory!r}")
    repeated = sorted({c for c in inventory if inventory.count(c) > 1})
    if repeated:
      raise ValueError(f"the symbols {repeated} occur more than once in {inventory!r}")
    self.inventory = inventory
    self.vocab_size = FIRST_SYMBOL + len(inventory)
    self._ids: Dict[str, int] = {c: FIRST_SYMBOL + k for k, c in enumerate(inventory)}

  def symbols(self, normalized: str) -> str:
    """The symbol string of a normalised, non-empty text."""
    raise NotImplementedError

  def encode(self, text: str) -> np.ndarray:
    """A transcript -> int32 ``[n]`` ids in ``[FIRST_SYMBOL, vocab_size)``, ``n >= 1``.

    Raises a ValueError for text that is empty after :func:`normalize_text` and for symbols
    outside the inventory (naming them and the text).
    """
    normalized = normalize_text(text)
    if not normalized:
      raise ValueError(f"cannot encode {text!r}: it is empty after normalisation")
    symbols = self.symbols(normalized)
    unknown = sorted(set(symbols) - self._ids.keys())
    if unknown:
      shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown)
      via = "" if symbols == normalized else f" (its symbols: {symbols!r})"
      raise ValueError(f"cannot encode {text!r}{via}: {shown} not in the tokenizer's "
                       f"symbols {self.inventory!r}")
    return np.fromiter((self._ids[c] for c in symbols), np.int32, len(symbols))

  def encode_batch(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Transcripts -> int32 ``[B, max_length]``, each row :meth:`encode` padded with PAD.

    Raises a ValueError when one encodes to more than ``max_length`` ids.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of texts, got a single str")
    if max_length < 1:
      raise ValueError(f"encode_batch max_length must be >= 1, got {max_length}")
    batch = np.full((len(texts), max_length), PAD, np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text)
      if ids.size > max_length:
        raise ValueError(f"text {row} of the batch encodes to {ids.size} ids, more than "
                         f"max_length {max_length}: {text!r}")
      batch[row, :ids.size] = ids
    return batch

  def decode(self, ids) -> str:
    """int ``[n]`` ids -> their symbols, skipping PAD and NULL.

    Raises a ValueError for ids outside ``[0, vocab_size)``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"decode takes integer ids [n], got {ids.dtype} of shape {ids.shape}")
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"decode: ids {sorted(set(bad.tolist()))} are outside [0, "
                       f"vocab_size = {self.vocab_size})")
    return "".join(self.inventory[i - FIRST_SYMBOL] for i in ids.tolist() if i >= FIRST_SYMBOL)


def _check_alphabet(alphabet: str) -> None:
  """Every character must survive normalize_text, or no text could ever contain it."""
  if not isinstance(alphabet, str) or not alphabet:
    raise ValueError(f"the alphabet must be a non-empty str, got {alphabet!r}")
  unreachable = [c for c in alphabet if normalize_text(f"a{c}a") != f"a{c}a"]
  if unreachable:
    raise ValueError(f"the alphabet {alphabet!r} holds {unreachable}, which normalize_text "
                     "changes (upper case, whitespace other than ' ', compatibility forms): "
                     "no normalised text contains them")


class CharTokenizer(SymbolTokenizer):
  """One id per character of ``alphabet`` (of normalised text: lower case)."""

  def __init__(self, alphabet: str = DEFAULT_ALPHABET):
    _check_alphabet(alphabet)
    super().__init__(alphabet)

  @property
  def alphabet(self) -> str:
    return self.inventory

  def symbols(self, normalized: str) -> str:
    return normalized


class PhonemeTokenizer(SymbolTokenizer):
  """One id per character of the IPA that eSpeak (voice ``en-us``) gives a transcript.

  ``decode(encode(text)) == espeak.phonemize(normalize_text(text))``. The IPA itself is not
  NFKC-normalised: that would turn modifier letters into plain ones.
  """

  def __init__(self):
    super().__init__(PHONEME_INVENTORY)

  def symbols(self, normalized: str) -> str:
    ipa = espeak.phonemize(normalized)
    if not ipa:
      raise ValueError(f"cannot encode {normalized!r}: eSpeak finds nothing to pronounce")
    return ipa


def text_config() -> ml_collections.ConfigDict:
  """The text settings of the TTS pipeline: which tokenizer, and its limits."""
  return ml_collections.ConfigDict(dict(
      tokenizer="chars",  # "chars" (one id per alphabet character) or "phonemes" (eSpeak IPA)
      alphabet=DEFAULT_ALPHABET,  # symbols of the "chars" tokenizer (ignored by "phonemes")
      max_length=128,  # text ids per utterance (padded with PAD); longer transcripts are errors
  ))


def make_text_tokenizer(text_cfg: ml_collections.ConfigDict) -> SymbolTokenizer:
  """The tokenizer ``text_cfg.tokenizer`` names (see :func:`text_config`)."""
  if text_cfg.tokenizer == "chars":
    return CharTokenizer(text_cfg.alphabet)
  if text_cfg.tokenizer == "phonemes":
    return PhonemeTokenizer()
  raise ValueError(f"unknown text.tokenizer {text_cfg.tokenizer!r}; valid names are "
                   f"{TOKENIZERS}")
