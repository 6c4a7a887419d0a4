"""The speech codec: log-mels of clips, encoding whole utterances, and a short training run
on tone sequences whose reconstruction error must fall with depth."""

import jax
import numpy as np
import pytest

from resgen_jax import config_base
from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import frontend
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import trainer

SAMPLE_RATE = 8000


def audio_cfg():
  cfg = frontend.audio_config()
  cfg.sample_rate, cfg.n_fft, cfg.win_length, cfg.hop_length = SAMPLE_RATE, 256, 256, 64
  cfg.n_mels, cfg.f_max = 24, 4000.0
  return cfg


def codec_cfg(depth=4):
  cfg = config_base.tokenizer_config()
  cfg.model.channels, cfg.model.channel_multipliers = 16, (1, 2)
  cfg.model.latent_dim, cfg.model.norm_groups = 8, 4
  cfg.quantizer.depth, cfg.quantizer.codebook_size = depth, 32
  cfg.quantizer.dropout_prob = 0.5
  cfg.crop_frames = 32
  cfg.train = config_base.train_config(batch_size=16, num_steps=150, learning_rate=3e-3,
                                       warmup_steps=20, log_every=150, eval_every=0,
                                       checkpoint_every=150, eval_batch_size=16,
                                       async_checkpoints=False)
  return cfg


def tone_sequence(rng, seconds):
  """Notes of random pitch and length, like a melody: a stand-in for speech."""
  t, out = 0, []
  total = int(seconds * SAMPLE_RATE)
  while t < total:
    n = int(rng.uniform(0.08, 0.25) * SAMPLE_RATE)
    f = rng.uniform(150, 2500)
    out.append(0.3 * np.sin(2 * np.pi * f * np.arange(n) / SAMPLE_RATE))
    t += n
  return np.concatenate(out)[:total].astype(np.float32)


def test_utterance_mels_is_log_mel_of_the_clip_followed_by_silence():
  cfg = audio_cfg()
  rng = np.random.default_rng(0)
  waves = [rng.normal(size=n).astype(np.float32) * 0.1 for n in (700, 2500, 2048, 5000)]
  mels = codec_lib.utterance_mels(waves, cfg)
  bucket = codec_lib.BUCKET_FRAMES * cfg.hop_length
  for wave, mel in zip(waves, mels):
    size = max(bucket, -(-(len(wave) + 1) // bucket) * bucket)
    padded = np.pad(wave, (0, size - len(wave)))
    reference = np.asarray(frontend.log_mel(padded[None], cfg))[0]
    assert mel.shape == (frontend.num_frames(len(wave), cfg), cfg.n_mels)
    np.testing.assert_allclose(mel, reference[:mel.shape[0]], atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A codec trained 150 steps on tone sequences, and held-out sequences' log-mels."""
  cfg, audio = codec_cfg(), audio_cfg()
  rng = np.random.default_rng(0)
  train = codec_lib.utterance_mels([tone_sequence(rng, rng.uniform(0.4, 1.2))
                                    for _ in range(48)], audio)
  held_out = codec_lib.utterance_mels([tone_sequence(rng, 1.0) for _ in range(16)], audio)
  task = codec_lib.SpeechCodecTask(cfg, audio)
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  crops = codec_lib.first_crops(held_out, cfg.crop_frames, audio)
  result = trainer.train_and_evaluate(
      task, cfg.train, str(tmp_path_factory.mktemp("codec")),
      codec_lib.MelCrops(train, cfg.crop_frames, cfg.train.batch_size, 0, audio),
      lambda: codec_lib.crop_eval_batches(crops, cfg.train.eval_batch_size), mesh, seed=0)
  return task, result.state, held_out, crops, mesh


def test_codec_error_falls_with_depth_and_eval_step_matches_decode(trained):
  task, state, held_out, crops, mesh = trained
  codec, params = task.tok, state.params["autoencoder"]
  books = state.model_state["codebook"].codebooks
  codes = codec.encode(params, books, crops)
  errors = [float(np.mean(np.abs(np.asarray(codec.decode(params, books, codes, prefix=j))
                                 - crops))) for j in range(1, codec.depth + 1)]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.95 * errors[0], errors
  metrics = trainer.evaluate(jax.jit(trainer.make_eval_step(task)), state, {},
                             codec_lib.crop_eval_batches(crops, 16), mesh)
  np.testing.assert_allclose([metrics[f"mel_l1_d{j}"] for j in range(1, codec.depth + 1)],
                             errors, rtol=1e-4)


def test_encode_utterances_does_not_depend_on_the_batch(trained):
  task, state, held_out, _, _ = trained
  params, books = state.params["autoencoder"], state.model_state["codebook"].codebooks
  short, long = held_out[0][:37], held_out[1]
  alone = codec_lib.encode_utterances(task.tok, params, books, [short], 1)[0]
  together = codec_lib.encode_utterances(task.tok, params, books, [long, short], 4)
  assert alone.shape == (task.tok.latent_frames(37), task.tok.depth)
  assert together[0].shape == (task.tok.latent_frames(long.shape[0]), task.tok.depth)
  np.testing.assert_array_equal(alone, together[1])


def test_mel_crops_are_deterministic_and_resume():
  audio = audio_cfg()
  rng = np.random.default_rng(1)
  mels = [rng.normal(size=(n, audio.n_mels)).astype(np.float32) for n in (10, 50, 90)]
  crops = codec_lib.MelCrops(mels, 32, 8, seed=3, audio_cfg=audio)
  first = [next(crops)["mel"] for _ in range(3)]
  again = codec_lib.MelCrops(mels, 32, 8, seed=3, audio_cfg=audio)
  again.set_state({"batches": 2})
  np.testing.assert_array_equal(next(again)["mel"], first[2])
  batch = first[0]
  assert batch.shape == (8, 32, audio.n_mels)
  for crop in batch:  # every crop is a window of one clip, padded with silence
    matches = [m for m in mels if any(np.array_equal(crop[:min(32, len(m))],
                                                     m[o:o + min(32, len(m))])
                                      for o in range(max(len(m) - 32, 0) + 1))]
    assert matches
  split = [codec_lib.MelCrops(mels, 32, 8, 3, audio, process_index=p, process_count=2)
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([next(s)["mel"] for s in split]), first[0])


def test_codec_refuses_bad_settings_and_inputs():
  audio = audio_cfg()
  bad = codec_cfg()
  bad.crop_frames = 31  # not a multiple of the downsampling 2
  with pytest.raises(ValueError, match="crop_frames"):
    codec_lib.SpeechCodecTask(bad, audio)
  bad = codec_cfg()
  bad.loss.gan_weight = 0.1
  with pytest.raises(ValueError, match="gan_weight"):
    codec_lib.SpeechCodecTask(bad, audio)
  codec = codec_lib.SpeechCodec(codec_cfg(), audio)
  with pytest.raises(ValueError, match="multiple of the codec's downsampling"):
    codec._check(np.zeros((1, 31, audio.n_mels)))
  with pytest.raises(ValueError, match="n_mels = 24"):
    codec._check(np.zeros((1, 32, 80)))


def test_librispeech_codec_is_the_papers_32_depths_of_1024_codes_at_10_8_frames_per_second():
  config = config_base.load_config_file("configs/librispeech.py")
  tok, audio = config.tokenizer, config.audio
  assert (tok.quantizer.depth, tok.quantizer.codebook_size) == (32, 1024)
  codec = codec_lib.SpeechCodec(tok, audio)
  assert abs(audio.sample_rate / audio.hop_length / codec.downsample - 10.8) < 0.05
  tok.model.channels = 32  # the layout of the config at a test's size
  codec = codec_lib.SpeechCodec(tok, audio)
  mels = np.random.default_rng(0).normal(-5, 2, (1, 64, audio.n_mels)).astype(np.float32)
  params = codec.autoencoder.init(jax.random.key(0), codec.normalize(mels))["params"]
  books = codec.init_codebooks(jax.random.key(1))
  codes = codec.encode(params, books, mels)
  assert codes.shape == (1, 8, 32) and int(codes.max()) < 1024
  assert codec.decode(params, books, codes).shape == mels.shape
