"""The speech classifiers on synthetic tones made with the audio front end: they learn,
ignore padding, train deterministically, validate their inputs, and save, load and
get-or-train through the shared file format; word targets and the word-set F1 by hand."""

import functools

import jax
import numpy as np
import pytest

from resgen_jax.audio import frontend
from resgen_jax.audio import speech_classifier

def test_word_targets():
  targets = speech_classifier.word_targets(["the cat sat", "  a dog\tand the  cat ", "", "Cat"],
                                 ["cat", "dog", "the"])
  np.testing.assert_array_equal(targets, [[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
  assert targets.dtype == bool and targets.shape == (4, 3)
  with pytest.raises(ValueError, match="repeats words"):
    speech_classifier.word_targets(["a"], ["a", "b", "a"])
  with pytest.raises(ValueError, match="empty"):
    speech_classifier.word_targets(["a"], [])
  with pytest.raises(ValueError, match="single words"):
    speech_classifier.word_targets(["a"], ["a b"])
  with pytest.raises(ValueError, match=r"texts\[1\]"):
    speech_classifier.word_targets(["a", None], ["a"])


def test_mean_f1():
  predicted = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  true = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], bool)
  # F1s: 2 * 1 / (2 + 2) = 0.5; both empty: 1; disjoint: 0; nothing predicted: 0.
  assert speech_classifier.mean_f1(predicted, true) == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)


# --------------------------------------------------------------------------------------
# Speech classifier on synthetic tones

SR, N_FFT, HOP, N_MELS = 8000, 256, 64, 20
WAVE_FRAMES = 64  # every synthetic wave has 1 + (WAVE_FRAMES - 1) = 64 log-mel frames
MIN_FRAMES = 16
SPEAKER_HZ = (250.0, 500.0, 1000.0, 2000.0)  # one tone per synthetic "speaker"
WORD_HZ = (300.0, 800.0, 1600.0, 3000.0)  # one tone burst per synthetic "word"
TRAIN_STEPS = 80


@pytest.fixture(scope="module")
def log_mel_fn():
  cfg = frontend.audio_config()
  cfg.update(sample_rate=SR, n_fft=N_FFT, win_length=N_FFT, hop_length=HOP, n_mels=N_MELS,
             f_max=SR / 2)
  return jax.jit(functools.partial(frontend.log_mel, cfg=cfg))


def random_clips(log_mel_fn, waves: np.ndarray, lengths: np.ndarray):
  """Log-mels of ``waves [N, T]`` in one call, each cut to its length in frames."""
  mels = np.asarray(log_mel_fn(waves.astype(np.float32)))
  return [mel[:length] for mel, length in zip(mels, lengths)]


def speaker_data(log_mel_fn, count: int, seed: int):
  """Clips of random lengths, each a tone at its speaker's frequency (+-3%) in noise."""
  rng = np.random.default_rng(seed)
  t = np.arange((WAVE_FRAMES - 1) * HOP) / SR
  labels = rng.integers(0, len(SPEAKER_HZ), count)
  hz = np.asarray(SPEAKER_HZ)[labels] * rng.uniform(0.97, 1.03, count)
  amplitude = rng.uniform(0.05, 0.5, count)
  waves = (amplitude[:, None] * np.sin(2 * np.pi * hz[:, None] * t + rng.uniform(0, 6, (count, 1)))
           + 0.01 * rng.normal(size=(count, t.size)))
  lengths = rng.integers(MIN_FRAMES, WAVE_FRAMES + 1, count)
  return random_clips(log_mel_fn, waves, lengths), labels


def words_data(log_mel_fn, count: int, seed: int):
  """Clips of random lengths holding a random subset of word tone bursts (8 frames each)."""
  rng = np.random.default_rng(seed)
  t = np.arange((WAVE_FRAMES - 1) * HOP) / SR
  lengths = rng.integers(MIN_FRAMES, WAVE_FRAMES + 1, count)
  targets = rng.random((count, len(WORD_HZ))) < 0.5
  waves = 0.01 * rng.normal(size=(count, t.size))
  burst = 8 * HOP
  for n in range(count):
    for k in np.flatnonzero(targets[n]):
      start = rng.integers(0, (lengths[n] - 1) * HOP - burst + 1)
      waves[n, start:start + burst] += 0.3 * np.sin(2 * np.pi * WORD_HZ[k] * t[:burst])
  return random_clips(log_mel_fn, waves, lengths), targets


@pytest.fixture(scope="module")
def speakers(log_mel_fn):
  return speaker_data(log_mel_fn, 128, seed=0), speaker_data(log_mel_fn, 64, seed=1)


@pytest.fixture(scope="module")
def speaker_classifier(speakers):
  (clips, labels), _ = speakers
  return speech_classifier.train_speech_classifier(clips, labels, "speaker", len(SPEAKER_HZ),
                                         num_steps=TRAIN_STEPS,
                                         class_names=["a", "b", "c", "d"])


def test_speaker_classifier_learns(speaker_classifier, speakers):
  _, (clips, labels) = speakers
  assert speaker_classifier.n_mels == N_MELS
  assert speech_classifier.score(speaker_classifier, clips, labels) >= 0.95
  shuffled = np.random.default_rng(0).permutation(labels)
  assert speech_classifier.score(speaker_classifier, clips, shuffled) < 0.6
  probabilities, features = speech_classifier.predict(speaker_classifier, clips, batch_size=10)
  assert probabilities.shape == (64, 4)
  assert features.shape == (64, speech_classifier.CONV_WIDTHS[-1])
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_words_classifier_learns(log_mel_fn):
  clips, targets = words_data(log_mel_fn, 128, seed=2)
  test_clips, test_targets = words_data(log_mel_fn, 64, seed=3)
  vocabulary = ["w300", "w800", "w1600", "w3000"]
  classifier = speech_classifier.train_speech_classifier(clips, targets, "words", len(WORD_HZ),
                                               num_steps=TRAIN_STEPS, class_names=vocabulary)
  assert speech_classifier.score(classifier, test_clips, test_targets) >= 0.9
  # Against the complementary word sets every F1 is 0 (or 1 for an empty set vs empty).
  assert speech_classifier.score(classifier, test_clips, ~test_targets) < 0.1
  with pytest.raises(ValueError, match="cutting it could drop its words"):
    speech_classifier.train_speech_classifier(clips, targets, "words", 4, num_steps=1,
                                              max_frames=20)


def test_padding_does_not_change_predictions(speaker_classifier, speakers):
  _, (clips, _) = speakers
  clip = clips[int(np.argmin([len(c) for c in clips]))]
  frames = len(clip)
  alone, alone_features = speech_classifier.predict(speaker_classifier, [clip])
  longer = np.zeros((300, N_MELS), np.float32)
  together, together_features = speech_classifier.predict(speaker_classifier, [clip, longer])
  np.testing.assert_allclose(together[0], alone[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(together_features[0], alone_features[0], rtol=1e-5, atol=1e-6)
  # Garbage in the padding frames is masked out; unpadded and padded inputs agree.
  model = speech_classifier.SpeechClassifier(4, speaker_classifier.mean, speaker_classifier.std)
  variables = {"params": speaker_classifier.params}
  apply = jax.jit(model.apply)
  exact, _ = apply(variables, clip[None], np.ones((1, frames), bool))
  for extra in (1, 2, 37):  # odd and even: the strided layers' alignment must not shift
    garbage = np.random.default_rng(extra).normal(size=(extra, N_MELS)) * 50.0
    padded = np.concatenate([clip, garbage])[None]
    valid = np.arange(frames + extra)[None] < frames
    logits, _ = apply(variables, padded, valid)
    np.testing.assert_allclose(logits, exact, rtol=1e-5, atol=1e-5)
    unmasked, _ = apply(variables, padded, np.ones_like(valid))
    assert not np.allclose(unmasked, exact, rtol=1e-3, atol=1e-3)  # the mask matters


def test_training_is_deterministic(speakers):
  (clips, labels), _ = speakers
  run = lambda seed: speech_classifier.train_speech_classifier(
      clips, labels, "speaker", 4, num_steps=3, max_frames=24, seed=seed)
  first, second, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first.params["logits"]["kernel"],
                                second.params["logits"]["kernel"])
  assert not np.array_equal(first.params["logits"]["kernel"], other.params["logits"]["kernel"])
  frames = np.concatenate(clips).astype(np.float64)
  np.testing.assert_allclose(first.mean, frames.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(first.std, frames.std(0), rtol=1e-5)


def test_standardisation_floors_constant_bins():
  rng = np.random.default_rng(6)
  clips = [rng.normal(2.0, 3.0, size=(n, 3)) for n in (5, 9)]
  for clip in clips:
    clip[:, 1] = -11.5  # a bin at the log floor throughout
  mean, std = speech_classifier.standardisation(clips)
  frames = np.concatenate(clips)
  np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, [frames[:, 0].std(), speech_classifier.STD_FLOOR,
                                   frames[:, 2].std()],
                             rtol=1e-6)


def test_training_validates_inputs(speakers):
  (clips, labels), _ = speakers
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    speech_classifier.train_speech_classifier(clips, labels, "speaker", 3, num_steps=1)
  with pytest.raises(ValueError, match="kind"):
    speech_classifier.train_speech_classifier(clips, labels, "language", 4, num_steps=1)
  with pytest.raises(ValueError, match=r"multi-hot \[128, 4\]"):
    speech_classifier.train_speech_classifier(clips, labels, "words", 4, num_steps=1)
  with pytest.raises(ValueError, match=r"log_mels\[1\] must be .*n_mels = 20"):
    speech_classifier.train_speech_classifier([clips[0], clips[1][:, :10]], labels[:2],
                                              "speaker", 4)
  with pytest.raises(ValueError, match="no clips"):
    speech_classifier.train_speech_classifier([], labels[:0], "speaker", 4)


def test_save_load_round_trip(speaker_classifier, speakers, tmp_path):
  _, (clips, _) = speakers
  path = str(tmp_path / "speaker.msgpack")
  speech_classifier.save(path, speaker_classifier)
  loaded = speech_classifier.load(path)
  assert (loaded.kind, loaded.num_classes, loaded.n_mels) == ("speaker", 4, N_MELS)
  assert loaded.class_names == ("a", "b", "c", "d")
  np.testing.assert_array_equal(loaded.std, speaker_classifier.std)
  for before, after in zip(speech_classifier.predict(speaker_classifier, clips),
                           speech_classifier.predict(loaded, clips)):
    np.testing.assert_array_equal(before, after)


def test_load_errors_name_the_path(speaker_classifier, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    speech_classifier.load(str(tmp_path / "missing.msgpack"))
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(b"not a classifier")
  with pytest.raises(ValueError, match="corrupt.msgpack"):
    speech_classifier.load(str(corrupt))
  truncated = tmp_path / "truncated.msgpack"
  speech_classifier.save(str(truncated), speaker_classifier)
  truncated.write_bytes(truncated.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated.msgpack"):
    speech_classifier.load(str(truncated))
  import dataclasses  # pylint: disable=g-import-not-at-top
  mismatched = tmp_path / "mismatched.msgpack"
  speech_classifier.save(str(mismatched), dataclasses.replace(speaker_classifier, num_classes=5,
                                                    class_names=None))
  with pytest.raises(ValueError, match="mismatched.msgpack.*do not fit"):
    speech_classifier.load(str(mismatched))
  wrong_bins = tmp_path / "wrong_bins.msgpack"
  speech_classifier.save(str(wrong_bins), dataclasses.replace(
      speaker_classifier, mean=np.zeros(16, np.float32), std=np.ones(16, np.float32)))
  with pytest.raises(ValueError, match="wrong_bins.msgpack.*do not fit"):
    speech_classifier.load(str(wrong_bins))


def test_get_or_train(speaker_classifier, speakers, tmp_path, monkeypatch):
  (clips, labels), _ = speakers
  path = str(tmp_path / "new.msgpack")
  calls = []

  def load_data():
    calls.append(1)
    return clips[:16], labels[:16]

  trained = speech_classifier.get_or_train(path, load_data, "speaker", 4, n_mels=N_MELS,
                                           num_steps=2)
  assert calls == [1] and speech_classifier.load(path).num_classes == 4

  def no_training(*args, **kwargs):
    raise AssertionError("an existing classifier file must be loaded, not retrained")

  monkeypatch.setattr(speech_classifier, "train_speech_classifier", no_training)
  loaded = speech_classifier.get_or_train(path, load_data, "speaker", 4)
  assert calls == [1]
  np.testing.assert_array_equal(loaded.params["logits"]["kernel"],
                                trained.params["logits"]["kernel"])
  saved = str(tmp_path / "saved.msgpack")
  speech_classifier.save(saved, speaker_classifier)
  assert speech_classifier.get_or_train(saved, load_data, "speaker", 4,
                                        class_names="abcd").class_names == tuple("abcd")
  for kwargs in (dict(kind="words", num_classes=4), dict(kind="speaker", num_classes=5),
                 dict(kind="speaker", num_classes=4, n_mels=80),
                 dict(kind="speaker", num_classes=4, class_names="abdc")):
    with pytest.raises(ValueError, match="saved.msgpack.*remove the file"):
      speech_classifier.get_or_train(saved, load_data, **kwargs)
