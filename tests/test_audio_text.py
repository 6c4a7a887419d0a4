"""Text normalisation and the character / phoneme tokenizers of text-to-speech."""

import ml_collections
import numpy as np
import pytest

from resgen_jax.audio import corpus
from resgen_jax.audio import espeak
from resgen_jax.audio import text

# Varied English beyond the corpus vocabulary: contractions, numbers, symbols, abbreviations,
# loanwords, names, syllabic consonants, flaps and foreign scripts (spelled out by eSpeak).
VARIED_SENTENCES = (
    "Hello, world! How are you today?",
    "I can't believe it's already 2024; we've got 15% left.",
    "Dr. Smith lives at 221B Baker St. with Mrs. Hudson, etc.",
    "The thirty-three thieves thought that they thrilled the throne throughout Thursday.",
    "She sells seashells by the seashore, and the azure pleasure of treasure.",
    "Bottle, button, little, rhythm, prism; water, butter, ladder, city.",
    "Is it a croissant, a genre, an ensemble or a naive cafe facade?",
    "Llanelli, Bach, the loch, Nguyen, Tchaikovsky and Zhivago.",
    "Which witch switched the Swiss wristwatches? Nobody knows why.",
    "Her huge orange umbrella was yellow, azure, beige and violet.",
    "Judge George joined the jury; the usual vision was measured.",
    "$5 & 10 @ #1 + 3.14 = 1,000,000 (roughly).",
    "Москва and Ελλάδα are far away.",
    "The quick brown fox jumps over the lazy dog.",
)


def test_normalize_text():
  assert text.normalize_text("  Hello\tWORLD\n  again ") == "hello world again"
  assert text.normalize_text("ＡＢＣ ﬁne") == "abc fine"  # NFKC: full width, ligature
  assert text.normalize_text(" \n\t ") == ""
  with pytest.raises(TypeError):
    text.normalize_text(b"bytes")


def test_char_tokenizer_ids_and_round_trip():
  tok = text.CharTokenizer()
  assert tok.vocab_size == 2 + len(text.DEFAULT_ALPHABET) == 35
  np.testing.assert_array_equal(tok.encode("ab"), [text.FIRST_SYMBOL, text.FIRST_SYMBOL + 1])
  ids = tok.encode("  Hello,  WORLD! Isn't it-fine? ")
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.min() >= text.FIRST_SYMBOL and ids.max() < tok.vocab_size  # never PAD / NULL
  assert tok.decode(ids) == "hello, world! isn't it-fine?"
  every = text.DEFAULT_ALPHABET.replace(" ", "") + " a"
  np.testing.assert_array_equal(np.sort(np.unique(tok.encode(every))),
                                np.arange(text.FIRST_SYMBOL, tok.vocab_size))


def test_char_tokenizer_errors_name_the_problem():
  tok = text.CharTokenizer()
  with pytest.raises(ValueError, match="empty after normalisation"):
    tok.encode(" \t\n")
  with pytest.raises(ValueError, match=r"'é'.*'5'|'5'.*'é'") as info:
    tok.encode("Café 5")
  assert "'Café 5'" in str(info.value)
  with pytest.raises(ValueError, match=r"ids \[40\] are outside \[0, vocab_size = 35\)"):
    tok.decode([2, 40])


def test_custom_alphabets_are_checked():
  tok = text.CharTokenizer("ab ")
  assert tok.vocab_size == 5 and tok.decode(tok.encode("ba ab")) == "ba ab"
  with pytest.raises(ValueError, match="more than once"):
    text.CharTokenizer("abca")
  with pytest.raises(ValueError, match=r"\['A'\].*normalize_text"):
    text.CharTokenizer("aAb")
  with pytest.raises(ValueError, match="normalize_text"):
    text.CharTokenizer("ab\t")
  with pytest.raises(ValueError, match="non-empty"):
    text.CharTokenizer("")


def test_encode_batch_pads_and_refuses_long_texts():
  tok = text.CharTokenizer()
  batch = tok.encode_batch(["abc", "Hello there", "x"], max_length=12)
  assert batch.shape == (3, 12) and batch.dtype == np.int32
  np.testing.assert_array_equal((batch != text.PAD).sum(axis=1), [3, 11, 1])
  assert np.all(batch[0, 3:] == text.PAD) and not np.any(batch == text.NULL)
  for row, expected in zip(batch, ["abc", "hello there", "x"]):
    assert tok.decode(row) == expected  # PAD is skipped
  assert tok.decode([text.NULL, 2, text.PAD]) == "a"
  with pytest.raises(ValueError, match="text 1 of the batch encodes to 11 ids, more than "
                     "max_length 5"):
    tok.encode_batch(["abc", "hello there"], max_length=5)
  with pytest.raises(TypeError):
    tok.encode_batch("abc", max_length=5)


def test_phonemize_is_english_ipa_joined_over_clauses():
  assert espeak.phonemize("hello world") == "həlˈoʊ wˈɜːld"
  assert espeak.phonemize("Hello, world.") == "həlˈoʊ wˈɜːld"  # two clauses, one space
  assert espeak.phonemize("hello world", voice="en") == "həlˈəʊ wˈɜːld"  # British
  assert espeak.phonemize("?!") == ""
  with pytest.raises(ValueError, match="empty"):
    espeak.phonemize("  ")


def test_phoneme_inventory_covers_the_corpus_vocabulary_and_varied_english():
  inventory = set(text.PHONEME_INVENTORY)
  assert len(inventory) == len(text.PHONEME_INVENTORY)
  for sentence in corpus.VOCABULARY + VARIED_SENTENCES:
    for voice in ("en-us", "en"):
      ipa = espeak.phonemize(sentence, voice=voice)
      assert ipa and set(ipa) <= inventory, (sentence, voice, set(ipa) - inventory)


def test_phoneme_tokenizer_round_trip():
  tok = text.PhonemeTokenizer()
  assert tok.vocab_size == 2 + len(text.PHONEME_INVENTORY)
  for sentence in (" ".join(corpus.VOCABULARY),) + VARIED_SENTENCES:
    ids = tok.encode(sentence)
    assert ids.min() >= text.FIRST_SYMBOL and ids.max() < tok.vocab_size
    assert tok.decode(ids) == espeak.phonemize(text.normalize_text(sentence))
  batch = tok.encode_batch(["yes", "no stop"], max_length=16)
  assert tok.decode(batch[0]) == "jˈɛs" and tok.decode(batch[1]) == "nˈoʊ stˈɑːp"
  with pytest.raises(ValueError, match="empty after normalisation"):
    tok.encode(" ")
  with pytest.raises(ValueError, match="nothing to pronounce"):
    tok.encode("?!")


def test_phoneme_tokenizer_names_symbols_outside_its_inventory(monkeypatch):
  monkeypatch.setattr(espeak, "phonemize", lambda s: "ʁoʊz")
  with pytest.raises(ValueError, match=r"'ʁ' \(U\+0281\) not in") as info:
    text.PhonemeTokenizer().encode("Rose")
  assert "'Rose'" in str(info.value) and "'ʁoʊz'" in str(info.value)


def test_make_text_tokenizer_from_config():
  cfg = text.text_config()
  assert (cfg.tokenizer, cfg.alphabet, cfg.max_length) == ("chars", text.DEFAULT_ALPHABET, 128)
  assert isinstance(text.make_text_tokenizer(cfg), text.CharTokenizer)
  cfg.alphabet = "xyz "
  assert text.make_text_tokenizer(cfg).vocab_size == 6
  cfg.tokenizer = "phonemes"
  assert isinstance(text.make_text_tokenizer(cfg), text.PhonemeTokenizer)
  with pytest.raises(ValueError, match="unknown text.tokenizer 'bytes'"):
    text.make_text_tokenizer(ml_collections.ConfigDict(dict(tokenizer="bytes", alphabet="")))
