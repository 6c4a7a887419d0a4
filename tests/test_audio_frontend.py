"""The audio front end against slow explicit references: mel filterbank, STFT and its
inverse, log-mel, Griffin-Lim, resampling, loudness and WAV files."""

import functools
import math
import os
import re
import wave

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.signal

from resgen_jax.audio import frontend

SR, N_FFT, HOP, N_MELS = 8000, 256, 64, 20
LENGTH = 4000  # not a multiple of HOP: 1 + 4000 // 64 = 63 frames


def small_config(**overrides) -> ml_collections.ConfigDict:
  cfg = frontend.audio_config()
  cfg.update(sample_rate=SR, n_fft=N_FFT, win_length=N_FFT, hop_length=HOP, n_mels=N_MELS,
             f_max=SR / 2)
  cfg.update(overrides)
  return cfg


def tones_and_sweep(length: int = LENGTH) -> np.ndarray:
  """``[1, length]``: 440 Hz and 1 kHz tones plus a 200 -> 1700 Hz linear chirp."""
  t = np.arange(length) / SR
  chirp = scipy.signal.chirp(t, f0=200.0, t1=t[-1], f1=1700.0)
  return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1000 * t)
          + 0.2 * chirp)[None].astype(np.float32)


@pytest.fixture(scope="module")
def cfg():
  return small_config()


@pytest.fixture(scope="module")
def jitted(cfg):
  """The transforms of ``cfg`` jitted once for the whole module."""
  return dict(stft=jax.jit(functools.partial(frontend.stft, cfg=cfg)),
              log_mel=jax.jit(functools.partial(frontend.log_mel, cfg=cfg)))


# --------------------------------------------------------------------------------------
# Mel filterbank


def slow_hz_to_mel(f: float, scale: str) -> float:
  if scale == "htk":
    return 2595.0 * math.log10(1.0 + f / 700.0)
  if f < 1000.0:
    return 3.0 * f / 200.0
  return 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)


def slow_mel_to_hz(m: float, scale: str) -> float:
  if scale == "htk":
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  if m < 15.0:
    return 200.0 * m / 3.0
  return 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def slow_filterbank(sr, n_fft, n_mels, f_min, f_max, scale):
  """Triangle by triangle, bin by bin, in Hz, each of unit area (Slaney normalisation)."""
  lo, hi = slow_hz_to_mel(f_min, scale), slow_hz_to_mel(f_max, scale)
  edges = [slow_mel_to_hz(lo + (hi - lo) * i / (n_mels + 1), scale) for i in range(n_mels + 2)]
  weights = np.zeros((n_fft // 2 + 1, n_mels))
  for m in range(n_mels):
    left, centre, right = edges[m], edges[m + 1], edges[m + 2]
    for k in range(n_fft // 2 + 1):
      f = k * sr / n_fft
      if left < f <= centre:
        weights[k, m] = (f - left) / (centre - left)
      elif centre < f < right:
        weights[k, m] = (right - f) / (right - centre)
      weights[k, m] *= 2.0 / (right - left)
  return weights, np.array(edges)


@pytest.mark.parametrize("scale,f_min,f_max", [("slaney", 0.0, 4000.0),
                                               ("slaney", 60.0, 3500.0),
                                               ("htk", 0.0, 4000.0)])
def test_mel_filterbank_matches_the_explicit_formula(scale, f_min, f_max):
  cfg = small_config(mel_scale=scale, f_min=f_min, f_max=f_max)
  bank = frontend.mel_filterbank(cfg)
  expected, edges = slow_filterbank(SR, N_FFT, N_MELS, f_min, f_max, scale)
  assert bank.shape == (N_FFT // 2 + 1, N_MELS) and bank.dtype == np.float32
  np.testing.assert_allclose(bank, expected, rtol=1e-5, atol=1e-9)
  assert np.all(bank >= 0)
  bins = np.arange(N_FFT // 2 + 1) * SR / N_FFT
  for m in range(N_MELS):
    # A triangle sampled on the FFT grid peaks at a bin next to its centre ...
    below = np.flatnonzero(bins <= edges[m + 1])[-1]
    assert np.argmax(bank[:, m]) in (below, below + 1), m
    # ... and is zero outside its edges.
    outside = (bins <= edges[m]) | (bins >= edges[m + 2])
    assert np.all(bank[outside, m] == 0), m


def test_too_many_mels_for_the_fft_size_raise():
  with pytest.raises(ValueError, match=r"n_mels = 80 is too many for n_fft = 64"):
    frontend.mel_filterbank(small_config(n_fft=64, win_length=64, hop_length=16, n_mels=80))


# --------------------------------------------------------------------------------------
# STFT, inverse STFT, log-mel


def reference_frames(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
  """``[T]`` -> ``[1 + T // hop, n_fft]``: frames of ``x`` mirrored by ``n_fft // 2`` samples
  at each end (the edge sample itself not repeated)."""
  p = n_fft // 2
  padded = np.concatenate([x[p:0:-1], x, x[-2:-p - 2:-1]])
  return np.stack([padded[f * hop:f * hop + n_fft] for f in range(1 + len(x) // hop)])


def reference_window(n_fft: int, win_length: int) -> np.ndarray:
  window = scipy.signal.get_window("hann", win_length, fftbins=True)  # periodic
  left = (n_fft - win_length) // 2
  return np.pad(window, (left, n_fft - win_length - left))


@pytest.mark.parametrize("win_length", [N_FFT, 160])
def test_stft_matches_a_direct_dft_of_windowed_frames(win_length):
  cfg = small_config(win_length=win_length)
  x = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32)
  spec = np.asarray(frontend.stft(x, cfg))
  assert spec.shape == (2, 1 + 1000 // HOP, N_FFT // 2 + 1) and spec.dtype == np.complex64
  n, k = np.arange(N_FFT), np.arange(N_FFT // 2 + 1)
  dft = np.exp(-2j * np.pi * np.outer(n, k) / N_FFT)
  window = reference_window(N_FFT, win_length)
  for b in range(2):
    expected = np.stack([(frame * window) @ dft
                         for frame in reference_frames(x[b].astype(np.float64), N_FFT, HOP)])
    np.testing.assert_allclose(spec[b], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("win_length,length", [(N_FFT, LENGTH), (160, 1001)])
def test_istft_inverts_stft_over_the_whole_clip(win_length, length):
  cfg = small_config(win_length=win_length)
  x = np.random.default_rng(1).uniform(-1, 1, (2, length)).astype(np.float32)
  y = np.asarray(frontend.istft(frontend.stft(x, cfg), cfg, length))
  assert y.shape == x.shape and y.dtype == np.float32
  # Every sample, first and last included; atol only for samples near 0.
  np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)


def test_log_mel_matches_a_numpy_reference(cfg, jitted):
  rng = np.random.default_rng(2)
  x = tones_and_sweep() + 0.01 * rng.standard_normal((1, LENGTH)).astype(np.float32)
  x[:, 1000:1500] = 0.0  # a silent stretch: frames inside it sit at the floor
  ours = np.asarray(jitted["log_mel"](x))
  frames = reference_frames(x[0].astype(np.float64), N_FFT, HOP)
  frames = frames * reference_window(N_FFT, N_FFT)
  magnitude = np.abs(np.fft.rfft(frames, axis=-1))  # magnitude, not power
  bank, _ = slow_filterbank(SR, N_FFT, N_MELS, 0.0, SR / 2, "slaney")
  expected = np.log(np.maximum(magnitude @ bank, cfg.log_floor))
  assert ours.shape == (1, 1 + LENGTH // HOP, N_MELS) and ours.dtype == np.float32
  np.testing.assert_allclose(ours[0], expected, atol=2e-3)
  assert np.any(ours == np.float32(np.log(cfg.log_floor)))


def test_transforms_reject_bad_shapes(cfg):
  with pytest.raises(ValueError, match=r"waves must be \[B, T\]"):
    frontend.stft(np.zeros(1000), cfg)
  with pytest.raises(ValueError, match="needs clips longer than that, got 128 samples"):
    frontend.stft(np.zeros((1, 128)), cfg)
  with pytest.raises(ValueError, match=r"spec must be \[B, F, n_fft // 2 \+ 1 = 129\]"):
    frontend.istft(np.zeros((1, 5, 128), np.complex64), cfg, 256)
  with pytest.raises(ValueError, match=r"magnitude for 4000 samples must be \[B, 63, 129\]"):
    frontend.griffin_lim(np.ones((1, 62, 129)), cfg, jax.random.key(0), LENGTH)


# --------------------------------------------------------------------------------------
# Inversion


def spectral_convergence(target, waves, cfg) -> float:
  """``||S - |STFT(x)||| / ||S||``."""
  rebuilt = jnp.abs(frontend.stft(waves, cfg))
  return float(jnp.linalg.norm(target - rebuilt) / jnp.linalg.norm(target))


def test_griffin_lim_converges_and_momentum_speeds_it_up(cfg, jitted):
  target = jnp.abs(jitted["stft"](tones_and_sweep()))
  key = jax.random.key(0)
  fast = jax.jit(lambda s, n: frontend.griffin_lim(s, cfg, key, LENGTH, n))
  errors = []
  for iters in (1, 8, 32):
    waves = fast(target, iters)
    assert waves.shape == (1, LENGTH) and waves.dtype == jnp.float32
    errors.append(spectral_convergence(target, waves, cfg))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.15, errors
  classic_cfg = small_config(griffin_lim_momentum=0.0)
  classic = frontend.griffin_lim(target, classic_cfg, key, LENGTH, 32)
  assert spectral_convergence(target, classic, cfg) > 1.2 * errors[2]


def test_griffin_lim_vocoder_inverts_log_mels(cfg, jitted):
  x = tones_and_sweep(64 * HOP)  # a multiple of HOP: the vocoder returns the same length
  log_mels = jitted["log_mel"](x)
  vocoder = frontend.GriffinLimVocoder(cfg, seed=0)
  assert isinstance(vocoder, frontend.Vocoder) and vocoder.sample_rate == SR
  waves = vocoder(log_mels)
  assert waves.shape == x.shape and waves.dtype == jnp.float32
  np.testing.assert_array_equal(waves, vocoder(log_mels))  # same seed, same phases
  # The mel magnitudes of the result are close to those it was made from.
  target, rebuilt = jnp.exp(log_mels), jnp.exp(jitted["log_mel"](waves))
  assert float(jnp.linalg.norm(rebuilt - target) / jnp.linalg.norm(target)) < 0.25
  linear = frontend.mel_to_linear(log_mels, cfg)
  assert linear.shape == (1, 65, N_FFT // 2 + 1) and float(linear.min()) >= 0.0
  with pytest.raises(ValueError, match=r"log_mels must be \[B, F >= 2, n_mels = 20\]"):
    vocoder(log_mels[..., :10])


# --------------------------------------------------------------------------------------
# Host-side preprocessing


def peak_hz(x: np.ndarray, sr: int) -> float:
  return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(np.abs(np.fft.rfft(x)))])


def test_resampling_keeps_the_frequency_and_length():
  tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
  down = frontend.resample(tone, 16000, 8000)
  up = frontend.resample(down, 8000, 16000)
  assert down.shape == (8000,) and up.shape == (16000,) and up.dtype == np.float32
  assert peak_hz(down, 8000) == 440.0 and peak_hz(up, 16000) == 440.0
  # A tone far below both Nyquist frequencies comes back intact away from the ends.
  np.testing.assert_allclose(up[500:-500], tone[500:-500], atol=1e-2)
  assert frontend.resample(tone, 22050, 16000).shape == (math.ceil(16000 * 16000 / 22050),)
  with pytest.raises(ValueError, match="orig_sr must be a positive integer"):
    frontend.resample(tone, 16000.5, 8000)


def test_loudness_normalisation_hits_the_target_and_rejects_silence():
  rng = np.random.default_rng(3)
  clip = (0.01 * np.sin(np.arange(8000) / 5) + 0.001 * rng.standard_normal(8000))
  for target in (-23.0, -30.0):
    out = frontend.normalize_loudness(clip, target)
    assert out.dtype == np.float32 and abs(frontend.rms_db(out) - target) < 0.1
  spiky = np.zeros(8000)
  spiky[::100] = 0.5
  assert np.abs(frontend.normalize_loudness(spiky, 0.0)).max() == 1.0  # clipped
  for silent in (np.zeros(8000), 1e-6 * rng.standard_normal(8000)):
    with pytest.raises(ValueError, match="the clip is silent"):
      frontend.normalize_loudness(silent, -23.0)


# --------------------------------------------------------------------------------------
# WAV files


def write_raw_wav(path, data: bytes, channels=1, width=2, rate=SR):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(channels)
    f.setsampwidth(width)
    f.setframerate(rate)
    f.writeframes(data)


def test_wav_round_trip_is_atomic_and_exact_to_one_step(tmp_path):
  clip = np.random.default_rng(4).uniform(-1, 1, 3001)
  clip[:2] = (-1.0, 1.0)
  path = str(tmp_path / "clip.wav")
  frontend.write_wav(path, clip, SR)
  assert os.listdir(tmp_path) == ["clip.wav"]  # no temporary file left
  read, rate = frontend.read_wav(path)
  assert rate == SR and read.dtype == np.float32 and read.shape == clip.shape
  assert np.abs(read - clip).max() <= 1 / 32768
  stereo = np.stack([np.full(10, 1000), np.full(10, -3000)], axis=1).astype("<i2")
  write_raw_wav(tmp_path / "stereo.wav", stereo.tobytes(), channels=2)
  mono, _ = frontend.read_wav(str(tmp_path / "stereo.wav"))
  np.testing.assert_array_equal(mono, np.full(10, -1000 / 32768, np.float32))  # downmixed


def test_a_failed_wav_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / "clip.wav")
  frontend.write_wav(path, np.zeros(10), SR)
  before = open(path, "rb").read()

  def fail(*_):
    raise OSError("disk full")

  monkeypatch.setattr(wave.Wave_write, "writeframes", fail)
  with pytest.raises(OSError, match="disk full"):
    frontend.write_wav(path, np.ones(10) / 2, SR)
  assert os.listdir(tmp_path) == ["clip.wav"] and open(path, "rb").read() == before


def test_bad_wav_files_raise_errors_naming_the_path(tmp_path):
  missing = str(tmp_path / "missing.wav")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    frontend.read_wav(missing)
  cases = {"corrupt.wav": "not a readable PCM WAV", "empty.wav": "empty", "none.wav":
           "holds no samples", "8bit.wav": "8-bit samples", "cut.wav": "truncated"}
  (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(5).bytes(1000))
  (tmp_path / "empty.wav").write_bytes(b"")
  write_raw_wav(tmp_path / "none.wav", b"")
  write_raw_wav(tmp_path / "8bit.wav", bytes(100), width=1)
  write_raw_wav(tmp_path / "full.wav", bytes(200))
  (tmp_path / "cut.wav").write_bytes((tmp_path / "full.wav").read_bytes()[:-50])
  for name, message in cases.items():
    path = str(tmp_path / name)
    with pytest.raises(ValueError, match=f"{re.escape(path)}.*{message}"):
      frontend.read_wav(path)
  with pytest.raises(ValueError, match="non-finite"):
    frontend.write_wav(str(tmp_path / "nan.wav"), np.array([0.0, np.nan]), SR)


# --------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("field,value", [
    ("sample_rate", 0), ("n_fft", 1023), ("n_fft", 1024.0), ("win_length", 2048),
    ("hop_length", 513), ("n_mels", 0), ("f_min", -1.0), ("f_min", 8000.0),
    ("f_max", 9000.0), ("mel_scale", "bark"), ("log_floor", 0.0),
    ("target_loudness_db", 3.0), ("griffin_lim_iters", 0), ("griffin_lim_momentum", 1.0)])
def test_bad_settings_raise_errors_naming_the_field(field, value):
  settings = frontend.audio_config().to_dict()
  settings[field] = value
  with pytest.raises(ValueError, match=rf"audio\.{field} must"):
    frontend.check_audio_config(ml_collections.ConfigDict(settings))


def test_default_settings_are_valid():
  cfg = frontend.audio_config()
  frontend.check_audio_config(cfg)
  assert frontend.mel_filterbank(cfg).shape == (513, 80)
  assert frontend.num_frames(cfg.sample_rate, cfg) == 63  # 62.5 frames/s, centred
