"""Zero-shot TTS on LibriSpeech, the paper's speech setting (method.md sections 1 and 6).

    python -m resgen_jax.main --config=configs/librispeech.py --workdir=gs://BUCKET/tts \
        --config.data.data_dir=gs://BUCKET/tfds

Data: TFDS ``librispeech`` (prepare it once with ``tfds build librispeech`` or
``--config.data.download=True``), trained on ``train_clean100`` (add the 360 h and 500 h
splits with a manifest for more), evaluated on ``test_clean`` clips of 4-10 s (the
paper's protocol) with 3 s prompts.
Codec: the paper's mel VAE with RVQ: 80 log-mels at 22.05 kHz with hop 256 (86.1 frames/s),
downsampled 8x to 10.8 token frames/s, 32 depths x 1024 codes.
Generator: ResGen with the transcript as characters through a text encoder and
cross-attention, trained with 3-second-style visible prompts half the time; 16 sampler
steps, CFG on the text.
Hardware: a TPU v4-64 / 8x H100 class machine (FSDP by mesh, as configs/imagenet.py).
Paper targets (625M, 16 steps, continuation): WER 1.79, SIM-o 0.574 with its ASR and
speaker-verification models, which the evaluate stage's exported lists are for.

``configs/librispeech.py:runlocal``: the same front end (22.05 kHz, hop 256), codec shape
(8x downsampling, depth 32), text encoder and cross-attention, bfloat16 and remat, shrunk
in sizes onto a few utterances of the embedded eSpeak corpus (LibriSpeech is not needed),
two steps of each training stage: every stage of this config's code path in about a
minute on 2 CPU cores. Its numbers mean nothing.
"""

from resgen_jax import config_base
from resgen_jax import layers


def get_config(variant: str = ""):
  """The paper's speech config, or (``variant="runlocal"``) its shrink: see the module
  docstring."""
  shrink = config_base.config_variant("librispeech", variant)
  config = config_base.base_config("speech")
  config.stages = ("tokenizer", "encode", "generator", "evaluate")
  data = config.data
  data.name = "librispeech"
  data.train_split, data.eval_split = "train_clean100", "test_clean"
  data.min_seconds, data.max_seconds = 1.0, 20.0

  audio = config.audio
  audio.sample_rate, audio.n_fft, audio.win_length, audio.hop_length = 22050, 1024, 1024, 256
  audio.n_mels, audio.f_max = 80, 11025.0

  tok = config.tokenizer
  tok.model.channels = 256
  tok.model.channel_multipliers = (1, 1, 2, 2)  # 8x fewer frames: 86.1 -> 10.8 per second
  tok.model.num_res_blocks = 2
  tok.model.latent_dim = 64
  tok.model.norm_groups = 32
  tok.quantizer.depth = 32
  tok.quantizer.codebook_size = 1024
  tok.quantizer.dropout_prob = 0.5
  tok.crop_frames = 256  # about 3 s
  tok.train.batch_size = 256
  tok.train.num_steps = 200_000
  tok.train.learning_rate = 4e-4
  tok.train.warmup_steps = 2000
  tok.train.eval_every = 10_000
  tok.train.checkpoint_every = 5000

  gen = config.generator
  gen.model.width = 1024
  gen.model.num_layers = 24
  gen.model.num_heads = 16
  gen.model.num_components = 64
  gen.model.low_rank = 64
  gen.model.text_layers = 4
  gen.model.text_mode = "cross"
  gen.model.dtype = "bfloat16"
  gen.model.remat = True
  gen.loss.prompt_prob = 0.5
  gen.loss.prompt_max_fraction = 0.7
  gen.train.batch_size = 256
  gen.train.num_steps = 400_000
  gen.train.learning_rate = 2e-4
  gen.train.warmup_steps = 5000
  gen.train.eval_every = 10_000
  gen.train.checkpoint_every = 5000
  config.text.max_length = 512
  config.mesh.rules = layers.TENSOR_PARALLEL_RULES

  config.sampler.steps = 16
  config.sampler.cfg_scale = 2.0
  config.evaluation.tts_prompt_seconds = 3.0
  if shrink:
    runlocal(config)
  return config


def runlocal(config) -> None:
  """Shrinks ``config`` in sizes onto 12 + 8 utterances of the eSpeak corpus."""
  data = config.data
  data.name, data.train_split, data.eval_split = "espeak", "train", "test"
  data.min_seconds, data.max_seconds = 0.5, 3.0
  data.espeak.update(train_utterances=12, eval_utterances=8)
  tok = config.tokenizer
  tok.model.update(channels=8, num_res_blocks=1, latent_dim=8, norm_groups=4)
  tok.quantizer.codebook_size = 16
  tok.crop_frames = 64
  tok.train.update(batch_size=8, eval_batch_size=8, num_steps=2, warmup_steps=1, log_every=1,
                   eval_every=0, checkpoint_every=2)
  gen = config.generator
  gen.model.update(width=32, num_layers=1, num_heads=2, num_components=4, low_rank=4,
                   text_layers=1)
  gen.train.update(batch_size=8, eval_batch_size=8, num_steps=2, warmup_steps=1, log_every=1,
                   eval_every=0, checkpoint_every=2)
  config.text.max_length = 64
  config.sampler.steps = 3
  config.synth.batch_size = 4
  config.evaluation.update(tts_classifier_steps=3, tts_prompt_seconds=0.5)
