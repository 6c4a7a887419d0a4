"""Speech corpora: eSpeak synthesis, the synthesised espeak corpus, user manifests of WAV
files, and LibriSpeech through a mocked TFDS (no download)."""

import logging
import math
import os
import sys
import threading
import time

import numpy as np
import pytest

from resgen_jax.audio import corpus
from resgen_jax.audio import espeak
from resgen_jax.audio import frontend

ESPEAK_RATE = 22050
WAV_RATE = 22050  # manifest WAVs are written at this rate and resampled to the config's
LOUDNESS_TOLERANCE_DB = 0.5  # normalize_loudness clips peaks, so the level may end lower


def audio_config(sample_rate: int = 16000):
  cfg = frontend.audio_config()
  cfg.sample_rate = sample_rate
  return cfg


def data_config(**overrides):
  cfg = corpus.speech_data_config()
  cfg.espeak.update(train_utterances=12, eval_utterances=6)
  cfg.update(overrides)
  return cfg


def median_f0(wave: np.ndarray, rate: int) -> float:
  """Median autocorrelation pitch (60..400 Hz) of the loud 40 ms frames of a clip."""
  size = int(0.04 * rate)
  frames = np.stack([wave[i:i + size] for i in range(0, wave.size - size, size // 2)])
  rms = np.sqrt(np.mean(np.square(frames), axis=1))
  low, high = int(rate / 400), int(rate / 60)
  estimates = []
  for frame in frames[rms > 0.3 * rms.max()]:
    frame = frame - frame.mean()
    correlation = np.correlate(frame, frame, "full")[size - 1:]
    estimates.append(rate / (low + np.argmax(correlation[low:high])))
  return float(np.median(estimates))


def dominant_hz(wave: np.ndarray, rate: int) -> float:
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
  return float(np.argmax(spectrum) * rate / wave.size)


# --------------------------------------------------------------------------------------
# eSpeak


def test_synthesis_is_deterministic_whatever_came_before():
  first, rate = espeak.synthesize("the red cat", "en+f2", 160, 50)  # f2 adds breath noise
  espeak.synthesize("something else entirely, spoken first", "en+m1", 200, 70)
  espeak.phonemize("and some phonemes")
  time.sleep(1.01 - time.time() % 1.0)  # eSpeak seeds its noise from the clock's seconds
  again, _ = espeak.synthesize("the red cat", "en+f2", 160, 50)
  assert rate == ESPEAK_RATE and first.dtype == np.float32
  np.testing.assert_array_equal(first, again)
  batch, _ = espeak.synthesize_many([("the red cat", "en+f2", 160, 50),
                                     ("a big dog", "en+m3", 150, 50)])
  np.testing.assert_array_equal(batch[0], first)
  batch_again, _ = espeak.synthesize_many([("the red cat", "en+f2", 160, 50),
                                           ("a big dog", "en+m3", 150, 50)])
  np.testing.assert_array_equal(batch[1], batch_again[1])


def test_synthesis_is_thread_safe():
  requests = [("yes no", "en+m1", 160, 50), ("up down left", "en+f4", 170, 40),
              ("stop go", "en-us+m2", 150, 60)]
  expected = [espeak.synthesize(*r)[0] for r in requests]
  results = {}

  def work(k):
    for _ in range(3):
      results.setdefault(k, []).append(espeak.synthesize(*requests[k % 3])[0])
      espeak.phonemize("music in the morning")

  threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for k, waves in results.items():
    for wave in waves:
      np.testing.assert_array_equal(wave, expected[k % 3])


def test_synthesis_sounds_like_speech():
  words = "yes no up down left right on off stop go"
  male, rate = espeak.synthesize(words, "en+m3", 160, 50)
  female, _ = espeak.synthesize(words, "en+f4", 160, 50)
  for wave in (male, female):
    assert np.abs(wave).max() <= 1.0 and frontend.rms_db(wave) > -40.0
    frame_rms = np.sqrt(np.mean(np.square(wave[:wave.size // 441 * 441].reshape(-1, 441)),
                                axis=1))  # 20 ms frames: speech alternates sound and pauses
    assert np.mean(frame_rms < 0.01 * frame_rms.max()) > 0.02
    assert np.mean(frame_rms > 0.1 * frame_rms.max()) > 0.5
  assert 70 < median_f0(male, rate) < 150 < median_f0(female, rate) < 300
  low, _ = espeak.synthesize(words, "en+m3", 160, 10)
  high, _ = espeak.synthesize(words, "en+m3", 160, 90)
  assert median_f0(low, rate) < 0.8 * median_f0(high, rate)
  durations = [espeak.synthesize(" ".join(["water"] * n), "en+m1", 160, 50)[0].size / rate
               for n in (1, 3, 6)]
  assert durations[0] < durations[1] < durations[2] and durations[2] > 4 * durations[0]
  fast, _ = espeak.synthesize(words, "en+m3", 320, 50)
  assert fast.size < 0.7 * male.size


def test_synthesis_errors_name_the_problem():
  with pytest.raises(ValueError, match="text is empty"):
    espeak.synthesize("  ", "en", 160, 50)
  with pytest.raises(ValueError, match="unknown eSpeak voice 'xx-nowhere'"):
    espeak.synthesize("hello", "xx-nowhere", 160, 50)
  with pytest.raises(ValueError, match="unknown eSpeak voice 'en\\+nobody'"):
    espeak.synthesize("hello", "en+nobody", 160, 50)
  with pytest.raises(ValueError, match=r"words_per_minute must be an integer in \[80, 450\]"):
    espeak.synthesize("hello", "en", 40, 50)
  with pytest.raises(ValueError, match=r"pitch must be an integer in \[0, 100\]"):
    espeak.synthesize("hello", "en", 160, 101)
  with pytest.raises(ValueError, match="no sound"):
    espeak.synthesize("?!", "en", 160, 50)


def test_a_missing_library_is_a_clear_error(monkeypatch):
  _, data_path = espeak.library_paths()
  monkeypatch.setattr(espeak, "library_paths",
                      lambda: ("/nowhere/libespeak-ng.so", data_path))
  with pytest.raises(RuntimeError, match="cannot load the eSpeak NG library "
                     "/nowhere/libespeak-ng.so"):
    espeak.synthesize("hello", "en", 160, 50)
  monkeypatch.undo()
  monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
  with pytest.raises(RuntimeError, match="pip install espeakng-loader"):
    espeak.synthesize("hello", "en", 160, 50)
  monkeypatch.undo()
  assert espeak.synthesize("hello", "en", 160, 50)[0].size  # loads again


# --------------------------------------------------------------------------------------
# The espeak corpus


def test_vocabulary_is_a_closed_set_of_short_words():
  words = corpus.vocabulary()
  assert len(words) == len(set(words)) == 40
  assert all(w.isascii() and w.isalpha() and w.islower() and len(w) <= 7 for w in words)
  np.testing.assert_array_equal(corpus.word_ids("Cat  dog yes"), [20, 21, 0])
  with pytest.raises(ValueError, match=r"unknown words: \['zebra'\]"):
    corpus.word_ids("cat zebra")


@pytest.fixture(scope="module")
def espeak_splits():
  cfg, audio = data_config(), audio_config()
  return cfg, (corpus.load_utterances(cfg, audio, "train"),
               corpus.load_utterances(cfg, audio, "test"))


def test_espeak_corpus_splits(espeak_splits):
  cfg, (train, test) = espeak_splits
  assert [len(train), len(test)] == [12, 6]  # all within the default duration limits
  assert [u.uid for u in train] == [f"train_{i:05d}" for i in range(12)]
  assert [u.speaker for u in train] == list(cfg.espeak.train_voices) * 2  # cycling
  assert {u.speaker for u in test} == set(cfg.espeak.eval_voices)
  assert not {u.speaker for u in train} & {u.speaker for u in test}
  assert len({u.text for u in train + test}) == 18
  for u in train + test:
    n = len(corpus.word_ids(u.text))
    assert cfg.espeak.min_words <= n <= cfg.espeak.max_words and u.text == u.text.lower()
    seconds = u.wave.size / 16000
    assert u.wave.dtype == np.float32 and cfg.min_seconds <= seconds <= cfg.max_seconds
    assert abs(frontend.rms_db(u.wave) - (-23.0)) < LOUDNESS_TOLERANCE_DB
  # the duration follows the word count (at a jittered rate)
  words = np.array([len(u.text.split()) for u in train])
  seconds = np.array([u.wave.size for u in train]) / 16000
  assert np.corrcoef(words, seconds)[0, 1] > 0.8


def test_espeak_corpus_is_deterministic_and_prefix_stable(espeak_splits):
  _, (train, _) = espeak_splits
  cfg = data_config()
  cfg.espeak.train_utterances = 7
  again = corpus.load_utterances(cfg, audio_config(), "train")
  for a, b in zip(train, again):
    assert (a.uid, a.speaker, a.text) == (b.uid, b.speaker, b.text)
    np.testing.assert_array_equal(a.wave, b.wave)
  other = corpus.espeak_scripts(data_config(), "validation")  # another eval split name
  assert [s.voice for s in other][:2] == list(data_config().espeak.eval_voices)
  assert [s.text for s in other] != [s.text for s in corpus.espeak_scripts(data_config(),
                                                                             "test")]
  reseeded = data_config()
  reseeded.espeak.seed = 1
  assert ([s.text for s in corpus.espeak_scripts(reseeded, "train")]
          != [u.text for u in train])


def test_espeak_rates_are_jittered():
  scripts = corpus.espeak_scripts(data_config(), "train")
  rates = np.array([s.words_per_minute for s in scripts])
  assert len(set(rates)) > 6
  assert np.all(np.abs(rates - 160) <= 160 * corpus.RATE_JITTER + 0.5)


def test_duration_filter(caplog):
  cfg = data_config(min_seconds=1.2, max_seconds=2.0)
  with caplog.at_level(logging.INFO):
    kept = corpus.load_utterances(cfg, audio_config(8000), "train")
  assert 0 < len(kept) < 12
  assert all(1.2 <= u.wave.size / 8000 <= 2.0 for u in kept)
  assert f"dropped {12 - len(kept)} of 12" in caplog.text
  with pytest.raises(ValueError, match=r"split 'test'.*min_seconds = 30.*max_seconds = 40"):
    corpus.load_utterances(data_config(min_seconds=30.0, max_seconds=40.0), audio_config(),
                           "test")
  with pytest.raises(ValueError, match="min_seconds"):
    corpus.load_utterances(data_config(min_seconds=3.0, max_seconds=2.0), audio_config(),
                           "test")


def test_unknown_source_and_bad_espeak_config():
  with pytest.raises(ValueError, match="unknown speech data.name 'vctk'"):
    corpus.load_utterances(data_config(name="vctk"), audio_config(), "train")
  cfg = data_config()
  cfg.espeak.eval_voices = ("en+nobody",)
  with pytest.raises(ValueError, match="en\\+nobody"):
    corpus.load_utterances(cfg, audio_config(), "test")
  cfg = data_config()
  cfg.espeak.min_words = 0
  with pytest.raises(ValueError, match="min_words"):
    corpus.espeak_scripts(cfg, "train")


# --------------------------------------------------------------------------------------
# Manifests


def tone(seconds: float, hz: float, amplitude: float, rate: int = WAV_RATE) -> np.ndarray:
  t = np.arange(int(seconds * rate)) / rate
  return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture
def manifest_dir(tmp_path):
  """Three WAVs at 22.05 kHz (one outside the manifest's folder) and a manifest."""
  (tmp_path / "wavs" / "spk1").mkdir(parents=True)
  frontend.write_wav(str(tmp_path / "wavs" / "spk1" / "a.wav"), tone(1.0, 440.0, 0.5), WAV_RATE)
  frontend.write_wav(str(tmp_path / "wavs" / "b.wav"), tone(1.5, 1000.0, 0.01), WAV_RATE)
  outside = tmp_path / "elsewhere.wav"
  frontend.write_wav(str(outside), tone(0.8, 300.0, 0.2), WAV_RATE)
  corpus.write_manifest(str(tmp_path / "data" / "train.tsv"), [
      ("../wavs/spk1/a.wav", "spk1", "Hello   WORLD"),
      ("../wavs/b.wav", "spk2", "  Second\u00a0line, with punctuation! "),
      (str(outside), "spk1", "absolute path"),
  ])
  return tmp_path


def test_manifest_round_trip(manifest_dir):
  path = str(manifest_dir / "data" / "train.tsv")
  cfg = data_config(name="manifest", path=path)
  utterances = corpus.load_utterances(cfg, audio_config(16000), "train")
  assert [u.uid for u in utterances] == ["../wavs/spk1/a", "../wavs/b", "../elsewhere"]
  assert [u.speaker for u in utterances] == ["spk1", "spk2", "spk1"]
  assert [u.text for u in utterances] == ["hello world", "second line, with punctuation!",
                                          "absolute path"]
  for u, seconds, hz in zip(utterances, (1.0, 1.5, 0.8), (440.0, 1000.0, 300.0)):
    assert u.wave.dtype == np.float32
    assert u.wave.size == math.ceil(int(seconds * WAV_RATE) * 16000 / WAV_RATE)
    assert abs(dominant_hz(u.wave, 16000) - hz) < 2.0  # resampled, not reinterpreted
    assert abs(frontend.rms_db(u.wave) - (-23.0)) < 0.01  # sines have a low crest factor
  # The eval split reads eval_path, falling back to path.
  assert len(corpus.load_utterances(cfg, audio_config(), "test")) == 3
  (manifest_dir / "data" / "eval.tsv").write_text(
      "path\tspeaker\ttext\n../wavs/b.wav\tspk2\tonly one\n")
  cfg.eval_path = str(manifest_dir / "data" / "eval.tsv")
  assert [u.text for u in corpus.load_utterances(cfg, audio_config(), "test")] == ["only one"]


def test_manifest_comments_blank_lines_header_and_crlf(manifest_dir):
  path = manifest_dir / "wavs" / "list.tsv"
  path.write_bytes(b"# a comment line\r\n\r\npath\tspeaker\ttext\r\n"
                   b"spk1/a.wav\tspk1\tfirst\r\n   \r\n#spk1/a.wav\tspk1\tcommented out\r\n"
                   b"b.wav\tspk2\tsecond\r\n")
  utterances = corpus.load_utterances(data_config(name="manifest", path=str(path)),
                                      audio_config(), "train")
  assert [(u.uid, u.speaker, u.text) for u in utterances] == [
      ("spk1/a", "spk1", "first"), ("b", "spk2", "second")]
  entries = corpus.read_manifest(str(path))
  assert [e.line for e in entries] == [4, 7]
  assert entries[0].audio_path == str(manifest_dir / "wavs" / "spk1" / "a.wav")


def write_lines(path, *lines) -> str:
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def load_manifest(path: str):
  return corpus.load_utterances(data_config(name="manifest", path=path), audio_config(),
                                "train")


def test_manifest_errors_name_the_file_and_line(manifest_dir):
  wavs = manifest_dir / "wavs"
  missing = str(wavs / "missing.tsv")
  with pytest.raises(FileNotFoundError, match=f"the manifest {missing} does not exist"):
    load_manifest(missing)
  with pytest.raises(ValueError, match="needs --config.data.path"):
    load_manifest("")
  path = write_lines(wavs / "cols.tsv", "# comment", "b.wav\tspk2\tfine", "b.wav\tspk2")
  with pytest.raises(ValueError, match=f"{path}:3: expected 3 tab-separated columns.*got 2"):
    load_manifest(path)
  path = write_lines(wavs / "text.tsv", "path\tspeaker\ttext", "b.wav\tspk2\t  \t")
  with pytest.raises(ValueError, match=f"{path}:2: expected 3 .* got 4"):
    load_manifest(path)
  path = write_lines(wavs / "text.tsv", "path\tspeaker\ttext", "b.wav\tspk2\t  ")
  with pytest.raises(ValueError, match=f"{path}:2: the text of b.wav is empty"):
    load_manifest(path)
  path = write_lines(wavs / "speaker.tsv", "b.wav\t\thello")
  with pytest.raises(ValueError, match=f"{path}:1: the speaker is empty"):
    load_manifest(path)
  path = write_lines(wavs / "dup.tsv", "b.wav\tspk2\tone", "", "./b.wav\tspk2\ttwo")
  with pytest.raises(ValueError, match=f"{path}:3: the utterance id 'b'.*repeats line 1"):
    load_manifest(path)
  path = write_lines(wavs / "empty.tsv", "# nothing but comments", "path\tspeaker\ttext")
  with pytest.raises(ValueError, match=f"the manifest {path} lists no utterances"):
    load_manifest(path)
  path = write_lines(wavs / "nowav.tsv", "b.wav\tspk2\tfine", "gone.wav\tspk1\thello")
  with pytest.raises(FileNotFoundError, match=f"{path}:2: no WAV file at .*gone.wav"):
    load_manifest(path)
  (wavs / "garbage.wav").write_bytes(b"this is not audio at all")
  (wavs / "garbled.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really a wav file")
  for name in ("garbage", "garbled"):  # frontend's ValueError; wave's bare RuntimeError
    path = write_lines(wavs / f"{name}.tsv", "b.wav\tspk2\tfine", f"{name}.wav\tspk1\thi")
    with pytest.raises(ValueError, match=f"{path}:2: .*{name}.wav.* not a readable PCM WAV"):
      load_manifest(path)
  frontend.write_wav(str(wavs / "silent.wav"), np.zeros(WAV_RATE, np.float32), WAV_RATE)
  path = write_lines(wavs / "silent.tsv", "b.wav\tspk2\tfine", "silent.wav\tspk1\thush")
  with pytest.raises(ValueError, match=f"{path}:2: normalize_loudness: the clip is silent"):
    load_manifest(path)
  (wavs / "latin1.tsv").write_bytes(b"b.wav\tspk2\tcaf\xe9\n")
  with pytest.raises(ValueError, match="latin1.tsv:1: not valid UTF-8"):
    load_manifest(str(wavs / "latin1.tsv"))


def test_write_manifest_refuses_unreadable_rows(tmp_path):
  path = str(tmp_path / "m.tsv")
  with pytest.raises(ValueError, match="row 1: the text must be .* without tabs"):
    corpus.write_manifest(path, [("a.wav", "s", "ok"), ("b.wav", "s", "tab\there")])
  with pytest.raises(ValueError, match=r"row 0 must be \(audio_path, speaker, text\)"):
    corpus.write_manifest(path, [("a.wav", "s")])
  assert not os.path.exists(path)  # atomic: nothing half-written


def test_manifest_duration_filter(manifest_dir):
  cfg = data_config(name="manifest", path=str(manifest_dir / "data" / "train.tsv"),
                    min_seconds=0.9, max_seconds=1.2)
  assert [u.uid for u in corpus.load_utterances(cfg, audio_config(), "train")] == [
      "../wavs/spk1/a"]


# --------------------------------------------------------------------------------------
# LibriSpeech (TFDS mocked: no download)

LIBRI_EXAMPLES = (  # (id, speaker, chapter, seconds, hz, text)
    ("1089-134686-0000", 1089, 134686, 1.0, 500.0, "HE HOPED THERE WOULD BE STEW"),
    ("1089-134686-0001", 1089, 134686, 0.2, 700.0, "STUFF IT"),  # too short: dropped
    ("121-121726-0000", 121, 121726, 2.0, 300.0, "ALSO A  POPULAR CONTRIVANCE'S"),
)


@pytest.fixture(scope="module")
def librispeech_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding librispeech's metadata (no records) with two splits."""
  from resgen_jax.data import sources  # pylint: disable=g-import-not-at-top
  sources.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("librispeech", data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir,
                                           dataset_name="librispeech", split="test_clean",
                                           filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[len(LIBRI_EXAMPLES)], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s in ("train_clean100", "test_clean")]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return data_dir


def fake_librispeech(self, split, **_):
  """Stands in for the builder's record reader: LIBRI_EXAMPLES as int16 16 kHz speech."""
  del self, split
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def examples():
    for uid, speaker, chapter, seconds, hz, transcript in LIBRI_EXAMPLES:
      speech = np.round(tone(seconds, hz, 0.3, 16000) * 32768).astype(np.int16)
      yield dict(id=uid, speaker_id=speaker, chapter_id=chapter, speech=speech,
                 text=transcript)

  return tf.data.Dataset.from_generator(examples, output_signature=dict(
      id=tf.TensorSpec([], tf.string), speaker_id=tf.TensorSpec([], tf.int64),
      chapter_id=tf.TensorSpec([], tf.int64), speech=tf.TensorSpec([None], tf.int16),
      text=tf.TensorSpec([], tf.string)))


def test_librispeech_through_mocked_tfds(librispeech_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = data_config(name="librispeech", data_dir=librispeech_dir, train_split="train_clean100",
                    eval_split="test_clean")
  with tfds.testing.mock_data(data_dir=librispeech_dir, as_dataset_fn=fake_librispeech,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    utterances = corpus.load_utterances(cfg, audio_config(8000), "test_clean")
    cfg.max_utterances = 1
    capped = corpus.load_utterances(cfg, audio_config(8000), "train_clean100")
  assert [(u.uid, u.speaker, u.text) for u in utterances] == [
      ("1089-134686-0000", "1089", "he hoped there would be stew"),
      ("121-121726-0000", "121", "also a popular contrivance's")]
  for u, seconds, hz in zip(utterances, (1.0, 2.0), (500.0, 300.0)):
    assert u.wave.size == int(seconds * 8000)  # 16 kHz resampled to the config's 8 kHz
    assert abs(dominant_hz(u.wave, 8000) - hz) < 2.0
    assert abs(frontend.rms_db(u.wave) - (-23.0)) < 0.01
  assert [u.uid for u in capped] == ["1089-134686-0000"]


def test_librispeech_not_prepared_explains_how(tmp_path):
  cfg = data_config(name="librispeech", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build librispeech") as info:
    corpus.load_utterances(cfg, audio_config(), "test_clean")
  assert str(tmp_path) in str(info.value)
