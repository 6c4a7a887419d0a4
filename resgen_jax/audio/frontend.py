"""Audio front end of text-to-speech: log-mel features, their inversion, and WAV files.

Speech is handled as mono float32 waves in [-1, 1] at ``cfg.sample_rate``; its features are
log-mel spectrograms (:func:`log_mel`), and a :class:`Vocoder` turns log-mels back into
waves (:class:`GriffinLimVocoder` needs no weights). The transforms are
pure JAX functions of float32 arrays; ``cfg`` holds static settings, so jit them with the
config closed over, e.g. ``jax.jit(functools.partial(log_mel, cfg=cfg))``. Resampling,
loudness normalisation and WAV I/O run on the host in numpy, at data-loading time.

Conventions (those of ``librosa.stft(center=True, pad_mode="reflect")`` -- librosa's default
padding is zeros since 0.10 -- and of ``torch.stft(center=True)``):

* STFT: a periodic Hann window of ``win_length`` samples, zero-padded at both ends to
  ``n_fft``; the wave is reflect-padded by ``n_fft // 2`` samples at each end, so frame ``f``
  is centred on sample ``f * hop_length`` and a ``T``-sample clip has ``1 + T // hop_length``
  frames. No normalisation of the DFT.
* Mel: the Slaney (Auditory Toolbox) mel scale by default, or HTK; triangles with Slaney area
  normalisation (each has unit area in Hz) on either scale: librosa's ``filters.mel``.
* Log-mel: the natural log of the mel-filtered *magnitude* (not power) spectrogram, floored
  at ``log_floor``: ``log(max(|STFT| @ mel, log_floor))``.
"""

from __future__ import annotations

import functools
import math
import os
import wave as wave_io
from typing import Optional, Protocol, Tuple, Union, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.signal

from resgen_jax.utils import files

Array = jax.Array

MEL_SCALES = ("slaney", "htk")
# The Slaney mel scale (Auditory Toolbox, librosa's default): linear at 200/3 Hz per mel up
# to 1 kHz (= 15 mels), logarithmic above, with 27 mels per factor 6.4 in frequency.
SLANEY_HZ_PER_MEL = 200.0 / 3.0
SLANEY_MIN_LOG_HZ = 1000.0
SLANEY_MIN_LOG_MEL = SLANEY_MIN_LOG_HZ / SLANEY_HZ_PER_MEL
SLANEY_LOG_STEP = math.log(6.4) / 27.0
# The HTK mel scale (O'Shaughnessy 1987): mel = 2595 log10(1 + f / 700).
HTK_MEL_FACTOR, HTK_CORNER_HZ = 2595.0, 700.0
# Samples whose window-sum-square is at most this are left undivided by istft (librosa
# uses the same float32 'tiny'); with hop_length <= win_length // 2 only padding samples,
# which istft trims, come near it.
WSS_FLOOR = float(np.finfo(np.float32).tiny)
# A clip whose RMS is below -80 dBFS (about 3 steps of 16-bit PCM) holds no signal to
# normalise: scaling it to a speech level would only amplify noise.
SILENT_RMS = 1e-4
# 16-bit PCM: a sample s in [-32768, 32767] stands for s / 32768 in [-1, 1).
PCM16_BYTES, PCM16_SCALE = 2, 32768.0


def audio_config() -> ml_collections.ConfigDict:
  """The audio settings of the TTS pipeline (16 kHz speech, 80 mels, 62.5 frames/s)."""
  return ml_collections.ConfigDict(dict(
      sample_rate=16000,  # Hz; every clip is resampled to it when loaded
      n_fft=1024,  # FFT size (even): n_fft // 2 + 1 = 513 frequency bins, 64 ms
      win_length=1024,  # periodic Hann window (<= n_fft, zero-padded to n_fft, centred)
      hop_length=256,  # samples between frames (<= win_length // 2): 16 ms, 62.5 frames/s
      n_mels=80,  # mel filters
      f_min=0.0,  # Hz, lower edge of the first mel filter
      f_max=8000.0,  # Hz, upper edge of the last mel filter (<= sample_rate / 2)
      mel_scale="slaney",  # "slaney" (librosa's default) or "htk"; Slaney area norm either way
      log_floor=1e-5,  # log_mel = log(max(mel magnitude, log_floor)): about -11.5
      # Loudness target of normalize_loudness in dBFS, measured as RMS (0 dB: RMS 1, so a
      # full-scale sine is -3 dB). Plain RMS, not LUFS: no K-weighting and no gating.
      target_loudness_db=-23.0,
      # The speech codec sees (log_mel - mel_mean) / mel_std: log-mels of speech at -23 dBFS
      # lie around -5 +- 2 (floor -11.5), so its input is roughly zero-mean, unit-scale.
      mel_mean=-5.0,
      mel_std=2.0,
      griffin_lim_iters=32,  # iterations of fast Griffin-Lim in GriffinLimVocoder
      griffin_lim_momentum=0.99,  # its momentum alpha in [0, 1) (Perraudin et al.: 0.99)
  ))


def check_audio_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first audio setting out of range."""
  for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels",
               "griffin_lim_iters"):
    value = cfg[name]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"audio.{name} must be an integer, got {value!r}")
  if cfg.sample_rate < 1:
    raise ValueError(f"audio.sample_rate must be >= 1 Hz, got {cfg.sample_rate}")
  if cfg.n_fft < 2 or cfg.n_fft % 2:
    # Even, so that centre padding by n_fft // 2 centres frame f on sample f * hop_length.
    raise ValueError(f"audio.n_fft must be even and >= 2, got {cfg.n_fft}")
  if not 1 <= cfg.win_length <= cfg.n_fft:
    raise ValueError(f"audio.win_length must be in [1, n_fft = {cfg.n_fft}], got "
                     f"{cfg.win_length}")
  if not 1 <= cfg.hop_length <= cfg.win_length // 2:
    # Every sample then lies under two or more windows, so the window-sum-square istft
    # divides by is bounded away from 0 and istft inverts stft on the whole clip.
    raise ValueError(f"audio.hop_length must be in [1, win_length // 2 = "
                     f"{cfg.win_length // 2}], got {cfg.hop_length}")
  if cfg.n_mels < 1:
    raise ValueError(f"audio.n_mels must be >= 1, got {cfg.n_mels}")
  if not 0.0 <= cfg.f_min < cfg.f_max:
    raise ValueError(f"audio.f_min must be in [0, f_max = {cfg.f_max}), got {cfg.f_min}")
  if cfg.f_max > cfg.sample_rate / 2:
    raise ValueError(f"audio.f_max must be <= sample_rate / 2 = {cfg.sample_rate / 2} Hz, "
                     f"got {cfg.f_max}")
  if cfg.mel_scale not in MEL_SCALES:
    raise ValueError(f"audio.mel_scale must be one of {MEL_SCALES}, got {cfg.mel_scale!r}")
  if not cfg.log_floor > 0.0:
    raise ValueError(f"audio.log_floor must be > 0, got {cfg.log_floor}")
  if not cfg.target_loudness_db <= 0.0:
    raise ValueError(f"audio.target_loudness_db must be <= 0 dBFS, got "
                     f"{cfg.target_loudness_db}")
  if not cfg.mel_std > 0.0:
    raise ValueError(f"audio.mel_std must be > 0, got {cfg.mel_std}")
  if cfg.griffin_lim_iters < 1:
    raise ValueError(f"audio.griffin_lim_iters must be >= 1, got {cfg.griffin_lim_iters}")
  if not 0.0 <= cfg.griffin_lim_momentum < 1.0:
    raise ValueError(f"audio.griffin_lim_momentum must be in [0, 1), got "
                     f"{cfg.griffin_lim_momentum}")


def num_frames(num_samples: int, cfg: ml_collections.ConfigDict) -> int:
  """STFT frames of a clip of ``num_samples`` samples: ``1 + num_samples // hop_length``."""
  return 1 + num_samples // cfg.hop_length


# --------------------------------------------------------------------------------------
# Mel filterbank (numpy, float64, at trace time)


def hz_to_mel(hz, scale: str) -> np.ndarray:
  """Frequencies in Hz -> mels on the ``"slaney"`` or ``"htk"`` scale (float64)."""
  hz = np.asarray(hz, np.float64)
  if scale == "htk":
    return HTK_MEL_FACTOR * np.log10(1.0 + hz / HTK_CORNER_HZ)
  logarithmic = SLANEY_MIN_LOG_MEL + np.log(np.maximum(hz, SLANEY_MIN_LOG_HZ) /
                                            SLANEY_MIN_LOG_HZ) / SLANEY_LOG_STEP
  return np.where(hz >= SLANEY_MIN_LOG_HZ, logarithmic, hz / SLANEY_HZ_PER_MEL)


def mel_to_hz(mels, scale: str) -> np.ndarray:
  """Inverse of :func:`hz_to_mel` (float64)."""
  mels = np.asarray(mels, np.float64)
  if scale == "htk":
    return HTK_CORNER_HZ * (10.0 ** (mels / HTK_MEL_FACTOR) - 1.0)
  logarithmic = SLANEY_MIN_LOG_HZ * np.exp(
      SLANEY_LOG_STEP * (np.maximum(mels, SLANEY_MIN_LOG_MEL) - SLANEY_MIN_LOG_MEL))
  return np.where(mels >= SLANEY_MIN_LOG_MEL, logarithmic, mels * SLANEY_HZ_PER_MEL)


def _mel_filterbank64(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """:func:`mel_filterbank` in float64."""
  check_audio_config(cfg)
  bins = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
  edges = mel_to_hz(np.linspace(hz_to_mel(cfg.f_min, cfg.mel_scale),
                                hz_to_mel(cfg.f_max, cfg.mel_scale), cfg.n_mels + 2),
                    cfg.mel_scale)
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins[:, None] - lower) / (centre - lower)
  falling = (upper - bins[:, None]) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
  empty = np.flatnonzero(weights.max(axis=0) == 0.0)
  if empty.size:
    raise ValueError(
        f"audio.n_mels = {cfg.n_mels} is too many for n_fft = {cfg.n_fft}: mel filters "
        f"{empty.tolist()} cover no FFT bin (bins are {cfg.sample_rate / cfg.n_fft:.3g} Hz "
        "apart); lower n_mels or raise n_fft")
  return weights


def mel_filterbank(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """The mel filterbank ``[n_fft // 2 + 1, n_mels]`` (float32), librosa's ``filters.mel``
  transposed: filter ``m`` rises linearly in Hz from edge ``m`` to its centre ``m + 1`` and
  falls to edge ``m + 2``, of ``n_mels + 2`` edges equally spaced in mels from ``f_min`` to
  ``f_max``, scaled by ``2 / (edge[m + 2] - edge[m])`` (Slaney area normalisation).

  Raises a ValueError when a filter is too narrow to cover any FFT bin.
  """
  return _mel_filterbank64(cfg).astype(np.float32)


# --------------------------------------------------------------------------------------
# STFT and its inverse (JAX)


def stft_window(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """The periodic Hann window of ``win_length`` zero-padded (centred) to ``[n_fft]``."""
  check_audio_config(cfg)
  taps = np.arange(cfg.win_length)
  hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * taps / cfg.win_length)
  left = (cfg.n_fft - cfg.win_length) // 2
  return np.pad(hann, (left, cfg.n_fft - cfg.win_length - left))


def _frames(padded: Array, n_fft: int, hop: int) -> Array:
  """Overlapping frames ``[B, F, n_fft]`` of ``[B, L]`` starting every ``hop`` samples,
  ``F = 1 + (L - n_fft) // hop``: slices of hop-sample chunks, no gather."""
  batch, size = padded.shape
  count, chunks_per_frame = 1 + (size - n_fft) // hop, -(-n_fft // hop)
  needed = (count + chunks_per_frame - 1) * hop
  padded = jnp.pad(padded[:, :needed], ((0, 0), (0, max(0, needed - size))))
  chunks = padded.reshape(batch, count + chunks_per_frame - 1, hop)
  frames = jnp.concatenate([chunks[:, k:k + count] for k in range(chunks_per_frame)], axis=-1)
  return frames[..., :n_fft]


def _overlap_add(frames: Array, hop: int) -> Array:
  """Sum of frames ``[B, F, n]`` placed every ``hop`` samples -> ``[B, n + hop (F - 1)]``
  (shifted adds of hop-sample chunks: deterministic, no scatter)."""
  batch, count, size = frames.shape
  chunks_per_frame = -(-size // hop)
  frames = jnp.pad(frames, ((0, 0), (0, 0), (0, chunks_per_frame * hop - size)))
  frames = frames.reshape(batch, count, chunks_per_frame, hop)
  total = sum(jnp.pad(frames[:, :, k], ((0, 0), (k, chunks_per_frame - 1 - k), (0, 0)))
              for k in range(chunks_per_frame))
  return total.reshape(batch, -1)[:, :size + hop * (count - 1)]


def _check_waves(waves: Array, cfg: ml_collections.ConfigDict) -> None:
  if waves.ndim != 2:
    raise ValueError(f"waves must be [B, T], got shape {waves.shape}")
  if waves.shape[1] <= cfg.n_fft // 2:
    raise ValueError(f"reflect padding by n_fft // 2 = {cfg.n_fft // 2} samples needs clips "
                     f"longer than that, got {waves.shape[1]} samples")


def stft(waves, cfg: ml_collections.ConfigDict) -> Array:
  """Short-time Fourier transform: float ``[B, T]`` -> complex64
  ``[B, 1 + T // hop_length, n_fft // 2 + 1]`` (centre reflect padding; see the module
  docstring)."""
  waves = jnp.asarray(waves, jnp.float32)
  window = stft_window(cfg)  # checks cfg
  _check_waves(waves, cfg)
  pad = cfg.n_fft // 2
  padded = jnp.pad(waves, ((0, 0), (pad, pad)), mode="reflect")
  frames = _frames(padded, cfg.n_fft, cfg.hop_length)
  return jnp.fft.rfft(frames * jnp.asarray(window, jnp.float32), axis=-1)


def window_sum_square(cfg: ml_collections.ConfigDict, frames: int) -> np.ndarray:
  """``sum_f window[t - f hop]^2`` over ``frames`` frames -> ``[n_fft + hop (frames - 1)]``
  (float64), the normaliser of the least-squares inverse STFT (Griffin & Lim 1984)."""
  squared = np.square(stft_window(cfg))
  starts = cfg.hop_length * np.arange(frames)
  total = np.zeros(cfg.n_fft + cfg.hop_length * (frames - 1))
  np.add.at(total, starts[:, None] + np.arange(cfg.n_fft), np.broadcast_to(
      squared, (frames, cfg.n_fft)))
  return total


def istft(spec, cfg: ml_collections.ConfigDict, length: int) -> Array:
  """Inverse of :func:`stft`: complex ``[B, F, n_fft // 2 + 1]`` -> float32 ``[B, length]``.

  Windowed inverse DFTs are overlap-added and divided by the window-sum-square (the
  least-squares signal whose STFT is nearest ``spec``), then the ``n_fft // 2`` padding
  samples are trimmed; a ``length`` beyond the frames' span is zero-filled. For any
  ``hop_length <= win_length // 2`` (a COLA window is not needed) ``istft(stft(x), cfg,
  T) == x`` up to float error over the whole clip.
  """
  spec = jnp.asarray(spec, jnp.complex64)
  window = stft_window(cfg)  # checks cfg
  if spec.ndim != 3 or spec.shape[-1] != cfg.n_fft // 2 + 1:
    raise ValueError(f"spec must be [B, F, n_fft // 2 + 1 = {cfg.n_fft // 2 + 1}], got "
                     f"shape {spec.shape}")
  if length < 1:
    raise ValueError(f"istft length must be >= 1, got {length}")
  frames = jnp.fft.irfft(spec, n=cfg.n_fft, axis=-1) * jnp.asarray(window, jnp.float32)
  summed = _overlap_add(frames, cfg.hop_length)
  wss = window_sum_square(cfg, spec.shape[1])
  summed = summed / jnp.asarray(np.where(wss > WSS_FLOOR, wss, 1.0), jnp.float32)
  start = cfg.n_fft // 2
  waves = summed[:, start:start + length]
  return jnp.pad(waves, ((0, 0), (0, length - waves.shape[1])))


def log_mel(waves, cfg: ml_collections.ConfigDict) -> Array:
  """Log-mel spectrogram: float ``[B, T]`` -> float32 ``[B, 1 + T // hop_length, n_mels]``,
  ``log(max(|STFT| @ mel_filterbank, log_floor))`` of the *magnitude* (not the power)."""
  magnitude = jnp.abs(stft(waves, cfg))
  mel = jnp.matmul(magnitude, jnp.asarray(mel_filterbank(cfg)),
                   precision=jax.lax.Precision.HIGHEST)  # no bf16 passes on TPU
  return jnp.log(jnp.maximum(mel, cfg.log_floor))


# --------------------------------------------------------------------------------------
# Inversion: mel -> linear magnitude -> wave


def mel_to_linear(log_mels, cfg: ml_collections.ConfigDict) -> Array:
  """Log-mels ``[B, F, n_mels]`` -> linear magnitudes ``[B, F, n_fft // 2 + 1]`` >= 0.

  The minimum-norm least-squares solution through the pseudo-inverse of the filterbank
  (float64 ``np.linalg.pinv``), clipped at 0: jittable, unlike librosa's NNLS. Bins outside
  ``[f_min, f_max]`` come back 0.
  """
  inverse = np.linalg.pinv(_mel_filterbank64(cfg)).astype(np.float32)  # [n_mels, F]
  mels = jnp.exp(jnp.asarray(log_mels, jnp.float32))
  return jnp.maximum(jnp.matmul(mels, jnp.asarray(inverse),
                                precision=jax.lax.Precision.HIGHEST), 0.0)


def griffin_lim(magnitude, cfg: ml_collections.ConfigDict, rng: Array, length: int,
                num_iters: Optional[Union[int, Array]] = None) -> Array:
  """Fast Griffin-Lim (Perraudin, Balazs & Sondergaard 2013): a wave whose STFT magnitude
  approaches ``magnitude``. float ``[B, F, n_fft // 2 + 1]`` -> float32 ``[B, length]``.

  From ``c_0 = magnitude * exp(i phi)`` with phases ``phi`` uniform from ``rng`` and
  ``t_0 = c_0``, each iteration projects onto consistent spectrograms and then onto the
  target magnitude, ``t_n = magnitude * phase(stft(istft(c_{n-1})))``, and extrapolates
  ``c_n = t_n + alpha (t_n - t_{n-1})`` (``alpha = griffin_lim_momentum``; 0 is classic
  Griffin-Lim). Returns ``istft(t_n)``, the last estimate with the target magnitude.

  Args:
    magnitude: linear STFT magnitudes, with ``F == 1 + length // hop_length`` frames.
    cfg: audio settings.
    rng: PRNG key of the initial phases.
    length: samples of the returned waves.
    num_iters: iterations (a traced scalar is fine: one compilation for every count);
      ``cfg.griffin_lim_iters`` when None.
  """
  magnitude = jnp.asarray(magnitude, jnp.float32)
  check_audio_config(cfg)
  expected = (num_frames(length, cfg), cfg.n_fft // 2 + 1)
  if magnitude.ndim != 3 or magnitude.shape[1:] != expected:
    raise ValueError(f"magnitude for {length} samples must be [B, {expected[0]}, "
                     f"{expected[1]}], got shape {magnitude.shape}")
  if num_iters is None:
    num_iters = cfg.griffin_lim_iters
  if isinstance(num_iters, int) and num_iters < 0:
    raise ValueError(f"griffin_lim num_iters must be >= 0, got {num_iters}")
  alpha = cfg.griffin_lim_momentum
  phases = jax.random.uniform(rng, magnitude.shape, maxval=2.0 * np.pi)
  start = magnitude * jnp.exp(1j * phases)

  def iteration(_, carry):
    extrapolated, previous = carry
    rebuilt = stft(istft(extrapolated, cfg, length), cfg)
    projected = magnitude * jnp.exp(1j * jnp.angle(rebuilt))
    return projected + alpha * (projected - previous), projected

  _, estimate = jax.lax.fori_loop(0, num_iters, iteration, (start, start))
  return istft(estimate, cfg, length)


# --------------------------------------------------------------------------------------
# Vocoders


@runtime_checkable
class Vocoder(Protocol):
  """Turns log-mels into waves: ``vocoder(log_mels [B, F, n_mels]) -> waves [B, T]`` at
  ``vocoder.sample_rate`` Hz (``T = (F - 1) * hop_length`` for the frame rate of
  :func:`log_mel`).

  A neural vocoder (HiFi-GAN, Vocos, ...) plugs in as any object with that call and a
  ``sample_rate`` attribute, e.g. a Flax module's ``apply`` closed over its parameters and
  wrapped in ``jax.jit``. It must be trained on the features of this front end: the same
  ``audio_config`` (sample rate, n_fft, hop, window, mel scale and range) and the natural log
  of mel *magnitudes* floored at ``log_floor``; a vocoder trained on log10 or power mels
  needs its input converted first. Load its weights yourself from a format that holds only
  arrays (``np.load(path, allow_pickle=False)`` of an ``.npz``, or
  ``flax.serialization.msgpack_restore``), never from a pickle (``torch.load`` of an
  untrusted checkpoint, ``allow_pickle=True``): unpickling runs arbitrary code.
  """

  sample_rate: int

  def __call__(self, log_mels) -> Array:
    ...


def _griffin_lim_vocode(log_mels: Array, cfg: ml_collections.ConfigDict, rng: Array) -> Array:
  length = (log_mels.shape[1] - 1) * cfg.hop_length
  return griffin_lim(mel_to_linear(log_mels, cfg), cfg, rng, length)


class GriffinLimVocoder:
  """A :class:`Vocoder` without weights: :func:`mel_to_linear`, then
  ``cfg.griffin_lim_iters`` iterations of :func:`griffin_lim` from phases drawn with
  ``seed`` (the same seed on every call: deterministic). Intelligible but phasey; a
  baseline and a test double for neural vocoders."""

  def __init__(self, cfg: ml_collections.ConfigDict, seed: int = 0):
    check_audio_config(cfg)
    self.cfg = cfg = cfg.copy_and_resolve_references()  # later edits of cfg change nothing
    self.sample_rate = cfg.sample_rate
    self._vocode = jax.jit(functools.partial(_griffin_lim_vocode, cfg=cfg,
                                             rng=jax.random.key(seed)))

  def __call__(self, log_mels) -> Array:
    """float ``[B, F, n_mels]`` -> float32 ``[B, (F - 1) * hop_length]``."""
    log_mels = jnp.asarray(log_mels, jnp.float32)
    if log_mels.ndim != 3 or log_mels.shape[-1] != self.cfg.n_mels or log_mels.shape[1] < 2:
      raise ValueError(f"log_mels must be [B, F >= 2, n_mels = {self.cfg.n_mels}], got "
                       f"shape {log_mels.shape}")
    return self._vocode(log_mels)


# --------------------------------------------------------------------------------------
# Host-side preprocessing (numpy, data loading)


def _check_clip(clip: np.ndarray, name: str) -> None:
  if clip.ndim != 1:
    raise ValueError(f"{name} takes a mono clip [T], got shape {clip.shape}")
  if not np.all(np.isfinite(clip)):
    raise ValueError(f"{name}: the clip holds non-finite samples")


def resample(wave, orig_sr: int, new_sr: int) -> np.ndarray:
  """Band-limited resampling of a mono clip: float ``[T]`` -> float32
  ``[ceil(T * new_sr / orig_sr)]``, by ``scipy.signal.resample_poly`` with the up/down
  factors reduced by their gcd (its Kaiser-windowed anti-aliasing FIR filter)."""
  for name, rate in (("orig_sr", orig_sr), ("new_sr", new_sr)):
    if not isinstance(rate, (int, np.integer)) or rate < 1:
      raise ValueError(f"resample {name} must be a positive integer number of Hz, got "
                       f"{rate!r}")
  clip = np.asarray(wave, np.float64)
  _check_clip(clip, "resample")
  if orig_sr == new_sr:
    return clip.astype(np.float32)
  divisor = math.gcd(int(orig_sr), int(new_sr))
  return scipy.signal.resample_poly(clip, int(new_sr) // divisor,
                                    int(orig_sr) // divisor).astype(np.float32)


def rms_db(wave) -> float:
  """RMS level of a clip in dBFS (0 dB: RMS 1); -inf for digital silence."""
  rms = np.sqrt(np.mean(np.square(np.asarray(wave, np.float64))))
  return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def normalize_loudness(wave, target_db: float) -> np.ndarray:
  """Scales a mono clip ``[T]`` so that its RMS level is ``target_db`` dBFS, then clips it to
  [-1, 1] (float32): a clip with high peaks (crest factor above ``-target_db`` dB) loses
  them and ends a little below the target.

  Raises a ValueError for a silent clip (RMS below ``SILENT_RMS``, -80 dBFS).
  """
  if not -math.inf < target_db <= 0.0:
    raise ValueError(f"normalize_loudness target_db must be a level <= 0 dBFS, got "
                     f"{target_db}")
  clip = np.asarray(wave, np.float64)
  _check_clip(clip, "normalize_loudness")
  if clip.size == 0:
    raise ValueError("normalize_loudness: the clip has no samples")
  rms = np.sqrt(np.mean(np.square(clip)))
  if rms < SILENT_RMS:
    raise ValueError(f"normalize_loudness: the clip is silent (RMS {rms:.3g} < "
                     f"{SILENT_RMS}, -80 dBFS); nothing to normalise")
  scaled = clip * (10.0 ** (target_db / 20.0) / rms)
  return np.clip(scaled, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# WAV files (16-bit PCM, standard library)


def read_wav(path: str) -> Tuple[np.ndarray, int]:
  """A 16-bit PCM WAV file -> (float32 wave ``[T]`` in [-1, 1), sample rate in Hz).

  Multi-channel files are downmixed to mono (the mean of the channels). Raises
  FileNotFoundError for a missing file and a ValueError naming the path for an empty,
  corrupt or truncated file, a sample width other than 16 bits, or non-PCM (e.g. float)
  data.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no WAV file at {path!r}")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path!r} is empty (0 bytes), not a WAV file")
  try:
    with wave_io.open(path, "rb") as f:
      channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
      count = f.getnframes()
      data = f.readframes(count)
  except (wave_io.Error, EOFError, RuntimeError) as e:  # RuntimeError: a garbled chunk
    raise ValueError(f"{path!r} is not a readable PCM WAV file ({e})") from e
  if width != PCM16_BYTES:
    raise ValueError(f"{path!r} holds {8 * width}-bit samples; only 16-bit PCM is supported")
  if count == 0:
    raise ValueError(f"{path!r} holds no samples")
  if len(data) != count * channels * width:
    raise ValueError(f"{path!r} is truncated: its header declares {count} frames, its data "
                     f"holds {len(data) // (channels * width)}")
  samples = np.frombuffer(data, "<i2").reshape(count, channels).astype(np.float32)
  return samples.mean(axis=1) / np.float32(PCM16_SCALE), rate


def write_wav(path: str, wave, sample_rate: int) -> None:
  """Writes a mono float clip ``[T]`` as a 16-bit PCM WAV, atomically (complete or absent).

  Samples are rounded to ``s * 32768`` and clipped to [-32768, 32767], so values outside
  [-1, 1) are clipped; :func:`read_wav` returns them within 1 / 32768.
  """
  clip = np.asarray(wave, np.float64)
  _check_clip(clip, "write_wav")
  if clip.size == 0:
    raise ValueError(f"write_wav: no samples to write to {path!r}")
  if not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
    raise ValueError(f"write_wav sample_rate must be a positive integer number of Hz, got "
                     f"{sample_rate!r}")
  info = np.iinfo(np.int16)
  pcm = np.clip(np.round(clip * PCM16_SCALE), info.min, info.max).astype("<i2")
  with files.atomic_write(path) as tmp:
    with wave_io.open(tmp, "wb") as f:
      f.setnchannels(1)
      f.setsampwidth(PCM16_BYTES)
      f.setframerate(int(sample_rate))
      f.writeframes(pcm.tobytes())
