"""Offline TTS metrics against slow explicit references (mel cepstrum, DTW, MCD), and the
speech classifier on synthetic tones made with the audio front end."""

import functools
import math
import time

import jax
import numpy as np
import pytest

from resgen_jax.audio import frontend
from resgen_jax.audio import metrics

# --------------------------------------------------------------------------------------
# Slow references


def slow_cepstrum(frame) -> np.ndarray:
  """The cepstrum of one log-spectrum frame ``[N]`` sampled at ``w_n = pi (n + 1/2) / N``,
  term by term: ``c_k = (1 / N) sum_n x_n cos(k w_n)``, so ``x(w) = c_0 + 2 sum_k c_k
  cos(k w)`` (SPTK's convention)."""
  n = len(frame)
  return np.array([sum(frame[i] * math.cos(k * math.pi * (i + 0.5) / n) for i in range(n)) / n
                   for k in range(n)])


def all_paths(n: int, m: int):
  """Every monotone path from (0, 0) to (n - 1, m - 1) in steps (1, 0), (0, 1), (1, 1)."""
  if n == 1 and m == 1:
    yield [(0, 0)]
    return
  for di, dj in ((1, 0), (0, 1), (1, 1)):
    if n - di >= 1 and m - dj >= 1:
      for path in all_paths(n - di, m - dj):
        yield path + [(n - 1, m - 1)]


def slow_dtw(cost) -> list:
  """Textbook DTW: the accumulated cost cell by cell, then backtracking."""
  n, m = cost.shape
  total = np.full((n + 1, m + 1), np.inf)
  total[0, 0] = 0.0
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j], total[i, j - 1],
                                             total[i - 1, j - 1])
  i, j, path = n, m, []
  while (i, j) != (0, 0):
    path.append((i - 1, j - 1))
    moves = [(total[i - 1, j - 1], i - 1, j - 1), (total[i - 1, j], i - 1, j),
             (total[i, j - 1], i, j - 1)]
    _, i, j = min(moves, key=lambda move: move[0])
    if (i == 0) != (j == 0):  # the border row/column of infinities is not a real cell
      raise AssertionError("backtracking left the grid")
  return path[::-1]


def slow_mcd(ref, gen, num_coeffs: int, align: str) -> float:
  ref_cep = np.array([slow_cepstrum(frame)[1:num_coeffs + 1] for frame in ref])
  gen_cep = np.array([slow_cepstrum(frame)[1:num_coeffs + 1] for frame in gen])
  if align == "none":
    pairs = [(f, f) for f in range(min(len(ref), len(gen)))]
  else:
    cost = np.array([[math.sqrt(sum((a - b) ** 2 for a, b in zip(r, g))) for g in gen_cep]
                     for r in ref_cep])
    pairs = slow_dtw(cost)
  per_frame = [10.0 / math.log(10.0) * math.sqrt(2.0 * sum(
      (ref_cep[i][k] - gen_cep[j][k]) ** 2 for k in range(num_coeffs))) for i, j in pairs]
  return sum(per_frame) / len(per_frame)


def check_path(rows, cols, n: int, m: int) -> None:
  assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (n - 1, m - 1)
  steps = set(zip(np.diff(rows).tolist(), np.diff(cols).tolist()))
  assert steps <= {(1, 0), (0, 1), (1, 1)}, steps


# --------------------------------------------------------------------------------------
# Mel cepstrum, DTW, MCD


def test_mel_cepstrum_matches_explicit_sum():
  log_mels = np.random.default_rng(0).normal(size=(6, 11)) * 3.0
  expected = np.array([slow_cepstrum(frame)[1:6] for frame in log_mels])
  cepstrum = metrics.mel_cepstrum(log_mels, 5)
  assert cepstrum.shape == (6, 5) and cepstrum.dtype == np.float64
  np.testing.assert_allclose(cepstrum, expected, rtol=1e-10, atol=1e-12)
  for bad in (0, 11, 2.0):
    with pytest.raises(ValueError, match="num_coeffs"):
      metrics.mel_cepstrum(log_mels, bad)
  with pytest.raises(ValueError, match=r"\[F, n_mels\]"):
    metrics.mel_cepstrum(log_mels[0], 5)


def test_dtw_path_matches_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(40):
    n, m = rng.integers(1, 7, size=2)
    cost = rng.random((n, m))
    if trial % 2:
      cost = rng.integers(0, 3, size=(n, m)).astype(float)  # many equal-cost paths
    best = min(sum(cost[i, j] for i, j in path) for path in all_paths(n, m))
    rows, cols = metrics.dtw_path(cost)
    check_path(rows, cols, n, m)
    assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)
    assert metrics.accumulated_cost(cost)[-1, -1] == pytest.approx(best, abs=1e-12)


def test_dtw_path_matches_textbook_dtw_and_is_fast():
  cost = np.random.default_rng(1).random((40, 55))
  rows, cols = metrics.dtw_path(cost)
  assert list(zip(rows.tolist(), cols.tolist())) == slow_dtw(cost)
  large = np.random.default_rng(2).random((500, 500))
  start = time.perf_counter()
  rows, cols = metrics.dtw_path(large)
  assert time.perf_counter() - start < 1.0
  check_path(rows, cols, 500, 500)
  for bad in (np.zeros((0, 3)), np.zeros(3), np.array([[0.0, np.nan]])):
    with pytest.raises(ValueError, match="DTW cost"):
      metrics.dtw_path(bad)


@pytest.mark.parametrize("align", ["dtw", "none"])
def test_mcd_matches_slow_reference(align):
  rng = np.random.default_rng(3)
  ref, gen = rng.normal(size=(9, 16)), rng.normal(size=(12, 16))
  expected = slow_mcd(ref, gen, 6, align)
  assert metrics.mel_cepstral_distortion(ref, gen, 6, align) == pytest.approx(expected,
                                                                              rel=1e-10)
  default = slow_mcd(ref, gen, metrics.NUM_CEPSTRAL_COEFFS, align)
  assert metrics.mel_cepstral_distortion(ref, gen, align=align) == pytest.approx(default,
                                                                                 rel=1e-10)


def test_mcd_hand_values():
  rng = np.random.default_rng(4)
  ref = rng.normal(size=(10, 20))
  # Adding 2 delta cos(w_n) to every frame moves c_1 by delta: MCD = (10 / ln 10) sqrt(2)
  # delta. A constant added to every bin moves only c_0: MCD 0.
  basis = 2.0 * np.cos(math.pi * (2 * np.arange(20) + 1) / 40)
  for align in metrics.ALIGNMENTS:
    assert metrics.mel_cepstral_distortion(ref, ref + 0.5 * basis, align=align) == (
        pytest.approx(10.0 / math.log(10.0) * math.sqrt(2.0) * 0.5, rel=1e-9))
    assert metrics.mel_cepstral_distortion(ref, ref + 3.0, align=align) == pytest.approx(
        0.0, abs=1e-9)
  # c_14 is beyond the 13 coefficients kept.
  beyond = np.cos(math.pi * 14 * (2 * np.arange(20) + 1) / 40)
  assert metrics.mel_cepstral_distortion(ref, ref + beyond, align="none") == pytest.approx(
      0.0, abs=1e-9)


def test_mcd_properties():
  rng = np.random.default_rng(5)
  ref, other = rng.normal(size=(30, 20)), rng.normal(size=(25, 20))
  for align in metrics.ALIGNMENTS:
    assert metrics.mel_cepstral_distortion(ref, ref, align=align) == 0.0
    forward = metrics.mel_cepstral_distortion(ref, other, align=align)
    assert forward > 0.0
    assert metrics.mel_cepstral_distortion(other, ref, align=align) == pytest.approx(
        forward, rel=1e-12)
  same_length = rng.normal(size=(30, 20))
  assert (metrics.mel_cepstral_distortion(ref, same_length, align="dtw")
          <= metrics.mel_cepstral_distortion(ref, same_length, align="none"))
  # A slowed-down copy (every frame twice) with a little noise: DTW undoes the stretch.
  stretched = np.repeat(ref, 2, axis=0) + 0.01 * rng.normal(size=(60, 20))
  warped = metrics.mel_cepstral_distortion(ref, stretched, align="dtw")
  unaligned = metrics.mel_cepstral_distortion(ref, stretched, align="none")
  assert warped < 0.1 * unaligned
  assert metrics.mel_cepstral_distortion(ref, np.repeat(ref, 3, axis=0)) == 0.0


def test_mcd_errors():
  ref = np.zeros((5, 20))
  with pytest.raises(ValueError, match="20 mel bins, gen_log_mels 16"):
    metrics.mel_cepstral_distortion(ref, np.zeros((5, 16)))
  with pytest.raises(ValueError, match="gen_log_mels is empty"):
    metrics.mel_cepstral_distortion(ref, np.zeros((0, 20)))
  with pytest.raises(ValueError, match=r"ref_log_mels must be .*\[F, n_mels\]"):
    metrics.mel_cepstral_distortion(np.zeros((1, 5, 20)), ref)
  with pytest.raises(ValueError, match="non-finite"):
    metrics.mel_cepstral_distortion(ref, np.full((5, 20), np.inf))
  with pytest.raises(ValueError, match="align"):
    metrics.mel_cepstral_distortion(ref, ref, align="linear")


def test_duration_ratio():
  assert metrics.duration_ratio(24000, 16000) == 1.5
  assert metrics.duration_ratio(np.zeros(100), np.zeros(400)) == 0.25
  assert metrics.duration_ratio(np.int64(0), 10) == 0.0
  with pytest.raises(ValueError, match="0 samples"):
    metrics.duration_ratio(10, np.zeros(0))
  with pytest.raises(ValueError, match="gen_samples"):
    metrics.duration_ratio(np.zeros((2, 10)), 10)
  with pytest.raises(ValueError, match="ref_samples"):
    metrics.duration_ratio(10, -3)
  with pytest.raises(ValueError, match="ref_samples"):
    metrics.duration_ratio(10, 2.5)


def test_word_targets():
  targets = metrics.word_targets(["the cat sat", "  a dog\tand the  cat ", "", "Cat"],
                                 ["cat", "dog", "the"])
  np.testing.assert_array_equal(targets, [[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
  assert targets.dtype == bool and targets.shape == (4, 3)
  with pytest.raises(ValueError, match="repeats words"):
    metrics.word_targets(["a"], ["a", "b", "a"])
  with pytest.raises(ValueError, match="empty"):
    metrics.word_targets(["a"], [])
  with pytest.raises(ValueError, match="single words"):
    metrics.word_targets(["a"], ["a b"])
  with pytest.raises(ValueError, match=r"texts\[1\]"):
    metrics.word_targets(["a", None], ["a"])


def test_mean_f1():
  predicted = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  true = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], bool)
  # F1s: 2 * 1 / (2 + 2) = 0.5; both empty: 1; disjoint: 0; nothing predicted: 0.
  assert metrics.mean_f1(predicted, true) == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)


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
  return metrics.train_speech_classifier(clips, labels, "speaker", len(SPEAKER_HZ),
                                         num_steps=TRAIN_STEPS,
                                         class_names=["a", "b", "c", "d"])


def test_speaker_classifier_learns(speaker_classifier, speakers):
  _, (clips, labels) = speakers
  assert speaker_classifier.n_mels == N_MELS
  assert metrics.score(speaker_classifier, clips, labels) >= 0.95
  shuffled = np.random.default_rng(0).permutation(labels)
  assert metrics.score(speaker_classifier, clips, shuffled) < 0.6
  probabilities, features = metrics.predict(speaker_classifier, clips, batch_size=10)
  assert probabilities.shape == (64, 4) and features.shape == (64, metrics.CONV_WIDTHS[-1])
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_words_classifier_learns(log_mel_fn):
  clips, targets = words_data(log_mel_fn, 128, seed=2)
  test_clips, test_targets = words_data(log_mel_fn, 64, seed=3)
  vocabulary = ["w300", "w800", "w1600", "w3000"]
  classifier = metrics.train_speech_classifier(clips, targets, "words", len(WORD_HZ),
                                               num_steps=TRAIN_STEPS, class_names=vocabulary)
  assert metrics.score(classifier, test_clips, test_targets) >= 0.9
  # Against the complementary word sets every F1 is 0 (or 1 for an empty set vs empty).
  assert metrics.score(classifier, test_clips, ~test_targets) < 0.1
  with pytest.raises(ValueError, match="cutting it could drop its words"):
    metrics.train_speech_classifier(clips, targets, "words", 4, num_steps=1, max_frames=20)


def test_padding_does_not_change_predictions(speaker_classifier, speakers):
  _, (clips, _) = speakers
  clip = clips[int(np.argmin([len(c) for c in clips]))]
  frames = len(clip)
  alone, alone_features = metrics.predict(speaker_classifier, [clip])
  longer = np.zeros((300, N_MELS), np.float32)
  together, together_features = metrics.predict(speaker_classifier, [clip, longer])
  np.testing.assert_allclose(together[0], alone[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(together_features[0], alone_features[0], rtol=1e-5, atol=1e-6)
  # Garbage in the padding frames is masked out; unpadded and padded inputs agree.
  model = metrics.SpeechClassifier(4, speaker_classifier.mean, speaker_classifier.std)
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
  run = lambda seed: metrics.train_speech_classifier(clips, labels, "speaker", 4, num_steps=3,
                                                     max_frames=24, seed=seed)
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
  mean, std = metrics.standardisation(clips)
  frames = np.concatenate(clips)
  np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, [frames[:, 0].std(), metrics.STD_FLOOR, frames[:, 2].std()],
                             rtol=1e-6)


def test_training_validates_inputs(speakers):
  (clips, labels), _ = speakers
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    metrics.train_speech_classifier(clips, labels, "speaker", 3, num_steps=1)
  with pytest.raises(ValueError, match="kind"):
    metrics.train_speech_classifier(clips, labels, "language", 4, num_steps=1)
  with pytest.raises(ValueError, match=r"multi-hot \[128, 4\]"):
    metrics.train_speech_classifier(clips, labels, "words", 4, num_steps=1)
  with pytest.raises(ValueError, match=r"log_mels\[1\] must be .*n_mels = 20"):
    metrics.train_speech_classifier([clips[0], clips[1][:, :10]], labels[:2], "speaker", 4)
  with pytest.raises(ValueError, match="no clips"):
    metrics.train_speech_classifier([], labels[:0], "speaker", 4)


def test_save_load_round_trip(speaker_classifier, speakers, tmp_path):
  _, (clips, _) = speakers
  path = str(tmp_path / "speaker.msgpack")
  metrics.save(path, speaker_classifier)
  loaded = metrics.load(path)
  assert (loaded.kind, loaded.num_classes, loaded.n_mels) == ("speaker", 4, N_MELS)
  assert loaded.class_names == ("a", "b", "c", "d")
  np.testing.assert_array_equal(loaded.std, speaker_classifier.std)
  for before, after in zip(metrics.predict(speaker_classifier, clips),
                           metrics.predict(loaded, clips)):
    np.testing.assert_array_equal(before, after)


def test_load_errors_name_the_path(speaker_classifier, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    metrics.load(str(tmp_path / "missing.msgpack"))
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(b"not a classifier")
  with pytest.raises(ValueError, match="corrupt.msgpack"):
    metrics.load(str(corrupt))
  truncated = tmp_path / "truncated.msgpack"
  metrics.save(str(truncated), speaker_classifier)
  truncated.write_bytes(truncated.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated.msgpack"):
    metrics.load(str(truncated))
  import dataclasses  # pylint: disable=g-import-not-at-top
  mismatched = tmp_path / "mismatched.msgpack"
  metrics.save(str(mismatched), dataclasses.replace(speaker_classifier, num_classes=5,
                                                    class_names=None))
  with pytest.raises(ValueError, match="mismatched.msgpack.*do not fit"):
    metrics.load(str(mismatched))
  wrong_bins = tmp_path / "wrong_bins.msgpack"
  metrics.save(str(wrong_bins), dataclasses.replace(
      speaker_classifier, mean=np.zeros(16, np.float32), std=np.ones(16, np.float32)))
  with pytest.raises(ValueError, match="wrong_bins.msgpack.*do not fit"):
    metrics.load(str(wrong_bins))


def test_get_or_train(speaker_classifier, speakers, tmp_path, monkeypatch):
  (clips, labels), _ = speakers
  path = str(tmp_path / "new.msgpack")
  calls = []

  def load_data():
    calls.append(1)
    return clips[:16], labels[:16]

  trained = metrics.get_or_train(path, load_data, "speaker", 4, n_mels=N_MELS, num_steps=2)
  assert calls == [1] and metrics.load(path).num_classes == 4

  def no_training(*args, **kwargs):
    raise AssertionError("an existing classifier file must be loaded, not retrained")

  monkeypatch.setattr(metrics, "train_speech_classifier", no_training)
  loaded = metrics.get_or_train(path, load_data, "speaker", 4)
  assert calls == [1]
  np.testing.assert_array_equal(loaded.params["logits"]["kernel"],
                                trained.params["logits"]["kernel"])
  saved = str(tmp_path / "saved.msgpack")
  metrics.save(saved, speaker_classifier)
  assert metrics.get_or_train(saved, load_data, "speaker", 4,
                              class_names="abcd").class_names == tuple("abcd")
  for kwargs in (dict(kind="words", num_classes=4), dict(kind="speaker", num_classes=5),
                 dict(kind="speaker", num_classes=4, n_mels=80),
                 dict(kind="speaker", num_classes=4, class_names="abdc")):
    with pytest.raises(ValueError, match="saved.msgpack.*remove the file"):
      metrics.get_or_train(saved, load_data, **kwargs)
