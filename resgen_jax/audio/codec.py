"""The speech codec: a 1-D convolutional mel autoencoder with RVQ (method.md section 1).

Speech is tokenized as its log-mel spectrogram (:mod:`frontend`): the encoder maps
normalised log-mels ``[B, F, n_mels]`` to latents ``[B, F/f, d_z]`` with strided 1-D
convolutions (``f = 2 ** (len(channel_multipliers) - 1)``, the temporal downsampling), the
residual quantizer turns each latent frame into ``D`` tokens, and the decoder maps summed
code embeddings back to log-mels, which a vocoder turns into a wave. The autoencoder is
:class:`resgen_jax.codec.autoencoder.AutoEncoder` itself (it works on any number of
spatial axes) with per-frame LayerNorm instead of GroupNorm (whose statistics over time
would make an utterance's codes depend on its padding), and :class:`SpeechCodecTask` is the image tokenizer's training task with
another input, so the codec trains with the same trainer, quantizer, EMA codebooks,
dead-code restarts, k-means initialisation and quantizer dropout.

Training sees random crops of ``tokenizer.crop_frames`` mel frames (:class:`MelCrops`);
encoding and decoding take whole utterances of any length (padded to a multiple of f).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax.audio import frontend
from resgen_jax.codec import autoencoder, rvq
from resgen_jax.codec.tokenizer import Tokenizer, TokenizerTask, prefix_decodes
from resgen_jax.data import pipeline as data_pipeline

# Waves are zero-padded to a multiple of this many hops before their log-mels are computed,
# so a corpus of clips of every length compiles one log-mel program per 0.5 s bucket (at
# 16 kHz and hop 256) instead of one per length.
BUCKET_FRAMES = 32
# Clips whose log-mels are computed in one call (a bucket's clips are batched).
MEL_BATCH = 64
# Silence frames encoded after every utterance: more than the encoder's receptive field
# (about 40 frames for three levels of 3-tap convolutions), so an utterance's codes do not
# depend on what else is in its batch or on the convolutions' zero padding further out.
ENCODE_MARGIN_FRAMES = 64


def silence(cfg: ml_collections.ConfigDict) -> float:
  """The log-mel value of digital silence: ``log(log_floor)``."""
  return math.log(cfg.log_floor)


@functools.lru_cache(maxsize=None)
def _log_mel_program(cfg_json: str):
  """The jitted log-mel of an audio config (one per config, so its compilations are kept
  from call to call: prompts, evaluation batches)."""
  return jax.jit(functools.partial(frontend.log_mel,
                                   cfg=ml_collections.ConfigDict(json.loads(cfg_json))))


def utterance_mels(waves: Sequence[np.ndarray], cfg: ml_collections.ConfigDict
                   ) -> List[np.ndarray]:
  """Log-mels of clips of any length: ``[T_i]`` -> float32 ``[1 + T_i // hop, n_mels]``.

  Each clip is followed by silence up to its bucket (``BUCKET_FRAMES`` hops) before the
  STFT, so a clip's last frames see zeros past its end instead of the reflection
  :func:`frontend.log_mel` would use; every path of the project (training, encoding,
  prompts, evaluation) computes log-mels here, so they agree.
  """
  frontend.check_audio_config(cfg)
  compute = _log_mel_program(cfg.to_json())
  bucket = BUCKET_FRAMES * cfg.hop_length
  out: List[Optional[np.ndarray]] = [None] * len(waves)
  lengths = [int(np.asarray(w).shape[0]) for w in waves]
  padded_lengths = [max(bucket, math.ceil((n + 1) / bucket) * bucket) for n in lengths]
  for size in sorted(set(padded_lengths)):
    members = [i for i, p in enumerate(padded_lengths) if p == size]
    for first in range(0, len(members), MEL_BATCH):
      chunk = members[first:first + MEL_BATCH]
      batch = np.zeros((MEL_BATCH, size), np.float32)  # one shape per bucket
      for row, i in enumerate(chunk):
        batch[row, :lengths[i]] = waves[i]
      mels = np.asarray(compute(batch))
      for row, i in enumerate(chunk):
        out[i] = mels[row, :frontend.num_frames(lengths[i], cfg)]
  return out


def pad_frames(log_mels: np.ndarray, length: int, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """``[F, n_mels]`` -> ``[length, n_mels]`` (``length >= F``), padded with silence."""
  if log_mels.shape[0] > length:
    raise ValueError(f"{log_mels.shape[0]} mel frames do not fit in {length}")
  return np.pad(log_mels, ((0, length - log_mels.shape[0]), (0, 0)),
                constant_values=silence(cfg))


class SpeechCodec(Tokenizer):
  """Mel autoencoder + RVQ of ``config.tokenizer`` for the log-mels of ``audio_cfg``.

      codes = codec.encode(params, codebooks, log_mels)   # [B, F, n_mels] -> [B, F/f, D]
      log_mels = codec.decode(params, codebooks, codes)   # -> [B, L*f, n_mels]

  ``F`` must be a multiple of the downsampling ``f`` (:meth:`padded_frames`).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, audio_cfg: ml_collections.ConfigDict):
    frontend.check_audio_config(audio_cfg)
    if cfg.model.mid_attention:
      raise ValueError("tokenizer.model.mid_attention is not supported by the speech codec "
                       "(its attention would span a whole variable-length utterance)")
    super().__init__(cfg, image_channels=audio_cfg.n_mels)
    # Per-frame normalisation: an utterance's codes must not depend on its padding.
    self.autoencoder = self.autoencoder.clone(norm="frame")
    self.audio_cfg = audio_cfg
    self.n_mels = audio_cfg.n_mels

  def normalize(self, log_mels: jax.Array) -> jax.Array:
    return (log_mels - self.audio_cfg.mel_mean) / self.audio_cfg.mel_std

  def denormalize(self, x: jax.Array) -> jax.Array:
    return x * self.audio_cfg.mel_std + self.audio_cfg.mel_mean

  def latent_frames(self, mel_frames: int) -> int:
    """Token positions of ``mel_frames`` frames: ``ceil(F / f)``."""
    return -(-mel_frames // self.downsample)

  def padded_frames(self, mel_frames: int) -> int:
    """``mel_frames`` rounded up to a multiple of the downsampling."""
    return self.latent_frames(mel_frames) * self.downsample

  def _check(self, log_mels: jax.Array) -> None:
    if log_mels.ndim != 3 or log_mels.shape[-1] != self.n_mels:
      raise ValueError(f"log-mels must be [B, F, n_mels = {self.n_mels}], got shape "
                       f"{log_mels.shape}")
    if log_mels.shape[1] % self.downsample:
      raise ValueError(f"{log_mels.shape[1]} mel frames are not a multiple of the codec's "
                       f"downsampling {self.downsample}; pad them (padded_frames)")

  def decode_latents(self, params, latents: jax.Array) -> jax.Array:
    """latents ``[B, L, d]`` -> normalised log-mels ``[B, L*f, n_mels]`` (not clipped)."""
    return self.autoencoder.apply({"params": params}, latents,
                                  method=autoencoder.AutoEncoder.decode)

  def encode(self, params, codebooks: jax.Array, log_mels: jax.Array) -> jax.Array:
    """log-mels ``[B, F, n_mels]`` -> int32 codes ``[B, F/f, D]``."""
    self._check(log_mels)
    z = self.encode_latents(params, self.normalize(log_mels))
    return rvq.quantize(z, codebooks, depth=self.depth).codes

  def decode(self, params, codebooks: jax.Array, codes: jax.Array,
             prefix: Optional[int] = None) -> jax.Array:
    """codes ``[B, L, D]`` -> log-mels ``[B, L*f, n_mels]`` from the first ``prefix``
    depths (all by default)."""
    return self.denormalize(super().decode(params, codebooks, codes, prefix))


class SpeechCodecTask(TokenizerTask):
  """Stage 1 for speech: trains the codec on batches ``{"mel": float [B, F, n_mels]}``
  (log-mels, ``F`` a multiple of the downsampling) with the image tokenizer's losses;
  evaluation reports the log-mel L1 error of every depth prefix (``mel_l1_d{j}``)."""

  def __init__(self, cfg: ml_collections.ConfigDict, audio_cfg: ml_collections.ConfigDict):
    if cfg.loss.gan_weight > 0 or cfg.loss.perceptual_weight > 0:
      raise ValueError("tokenizer.loss.gan_weight and perceptual_weight must be 0 for the "
                       "speech codec: its discriminator and LPIPS are image networks")
    if cfg.crop_frames < 1:
      raise ValueError(f"tokenizer.crop_frames must be >= 1, got {cfg.crop_frames}")
    codec = SpeechCodec(cfg, audio_cfg)
    if cfg.crop_frames % codec.downsample:
      raise ValueError(f"tokenizer.crop_frames ({cfg.crop_frames}) must be a multiple of the "
                       f"codec's temporal downsampling {codec.downsample}")
    super().__init__(cfg, audio_cfg.n_mels, tokenizer=codec)

  def inputs(self, batch: dict) -> jax.Array:
    mels = batch["mel"]
    self.tok._check(mels)  # pylint: disable=protected-access
    return self.tok.normalize(mels)

  def quality(self, reconstruction: jax.Array, x: jax.Array) -> dict:
    """Mean absolute log-mel error (nats) of the reconstruction."""
    return {"mel_l1": jnp.mean(jnp.abs(reconstruction - x)) * self.tok.audio_cfg.mel_std}

  def eval_step(self, params, model_state, constants, batch):
    del constants
    valid = batch["valid"].astype(jnp.float32)
    x = self.inputs(batch)
    decodes = prefix_decodes(self.tok, params["autoencoder"],
                             model_state["codebook"].codebooks, x)  # [D, B, F, n_mels]
    error = jnp.mean(jnp.abs(decodes - x), axis=(2, 3)) * self.tok.audio_cfg.mel_std
    sums = {f"mel_l1_d{j + 1}": jnp.sum(error[j] * valid) for j in range(self.tok.depth)}
    sums["count"] = jnp.sum(valid)
    return sums


class MelCrops:
  """Infinite batches ``{"mel": float32 [B/P, crop_frames, n_mels]}`` of random crops of
  utterances' log-mels (clips shorter than a crop are followed by silence).

  Global batch ``n`` is drawn from ``np.random.default_rng([seed, n])`` (which utterance,
  where the crop starts), and process ``p`` takes its slice of it, so the data of a step
  does not depend on the process layout; the state is ``{"batches": n}``.
  """

  def __init__(self, log_mels: Sequence[np.ndarray], crop_frames: int, global_batch_size: int,
               seed: int, audio_cfg: ml_collections.ConfigDict, process_index: int = 0,
               process_count: int = 1):
    if not log_mels:
      raise ValueError("no utterances to train the speech codec on")
    self.local = data_pipeline.local_batch_size(global_batch_size, process_count)
    self.log_mels, self.crop, self.seed = list(log_mels), crop_frames, seed
    self.global_batch_size, self.process_index = global_batch_size, process_index
    self.audio_cfg = audio_cfg
    self._batches = 0

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self._batches])
    chosen = rng.integers(0, len(self.log_mels), self.global_batch_size)
    starts = rng.random(self.global_batch_size)
    first = self.process_index * self.local
    crops = []
    for index, start in zip(chosen[first:first + self.local], starts[first:first + self.local]):
      mel = self.log_mels[index]
      offset = int(start * max(mel.shape[0] - self.crop, 0) + 0.5)
      crops.append(pad_frames(mel[offset:offset + self.crop], self.crop, self.audio_cfg))
    self._batches += 1
    return {"mel": np.stack(crops).astype(np.float32)}

  def get_state(self) -> dict:
    return {"batches": self._batches}

  def set_state(self, state: dict) -> None:
    self._batches = data_pipeline.check_state(state)


def first_crops(log_mels: Sequence[np.ndarray], crop_frames: int,
                audio_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """The first ``crop_frames`` frames of every utterance (silence-padded) -> ``[N, crop,
  n_mels]``: the codec's fixed evaluation set."""
  return np.stack([pad_frames(m[:crop_frames], crop_frames, audio_cfg) for m in log_mels])


def crop_eval_batches(crops: np.ndarray, global_batch_size: int, process_index: int = 0,
                      process_count: int = 1, max_examples=None) -> Iterator[dict]:
  """One sequential pass ``{"mel", "valid"}`` over fixed crops, sharded like training."""
  from resgen_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.ArraySource("mel_crops", crops, np.zeros(len(crops), np.int32), 1)
  for batch in data_pipeline.sequential_batches(source, global_batch_size, process_index,
                                                process_count, max_examples):
    yield {"mel": batch["image"], "valid": batch["valid"]}


def encode_utterances(codec: SpeechCodec, params, codebooks, log_mels: Sequence[np.ndarray],
                      batch_size: int) -> List[np.ndarray]:
  """Codes of whole utterances: ``[F_i, n_mels]`` -> int32 ``[ceil(F_i / f), D]``.

  Utterances are followed by silence up to the longest one's length plus
  ``ENCODE_MARGIN_FRAMES`` and encoded ``batch_size`` at a time (one compiled shape); each
  keeps its own latent frames, the same whatever else is in the set.
  """
  encode = jax.jit(codec.encode)
  length = codec.padded_frames(max(m.shape[0] for m in log_mels) + ENCODE_MARGIN_FRAMES)
  out = []
  for first in range(0, len(log_mels), batch_size):
    chunk = log_mels[first:first + batch_size]
    batch = np.stack([pad_frames(m, length, codec.audio_cfg) for m in chunk] +
                     [pad_frames(chunk[0][:0], length, codec.audio_cfg)] *
                     (batch_size - len(chunk)))
    codes = np.asarray(encode(params, codebooks, jnp.asarray(batch)))
    out.extend(c[:codec.latent_frames(m.shape[0])] for c, m in zip(codes, chunk))
  return out


def silence_codes(codec: SpeechCodec, params, codebooks) -> np.ndarray:
  """The tokens of silence, int32 ``[D]`` (those of the middle of a silent stretch): what
  follows an utterance in the codec's training crops, so synthesis decodes padding as
  silence."""
  frames = codec.padded_frames(2 * ENCODE_MARGIN_FRAMES)
  quiet = np.full((1, frames, codec.n_mels), silence(codec.audio_cfg), np.float32)
  codes = np.asarray(jax.jit(codec.encode)(params, codebooks, jnp.asarray(quiet)))
  return codes[0, codes.shape[1] // 2]
