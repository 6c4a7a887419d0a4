"""The embedded speech default: zero-shot TTS on a synthetic multi-speaker corpus.

    python -m resgen_jax.main --config=configs/tts_tiny.py --workdir=/tmp/tts

No download: the eSpeak NG speech engine (its library ships in the ``espeakng-loader``
package) speaks sentences of a 40-word vocabulary in sixteen voices (the training
speakers); two more voices are the unseen speakers of the eval split. The run trains the speech codec
(80 log-mels at 62.5 frames/s, downsampled 4x to 15.6 token frames/s, depth 8), encodes
the corpus, trains the text-conditioned ResGen generator, and runs the zero-shot
evaluation (continuation and cross-sentence) with Griffin-Lim as the vocoder.

Hardware: 2 CPU cores, 12-13 minutes for every stage. Measured: log-mel L1 of the
codec by depth prefix 0.68 -> 0.49 nats (``DIR/tokenizer/results.json``); on the unseen
voices (``DIR/tts_eval/<tag>/results.json``) continuation MCD 6.6 dB, cross-sentence
duration ratio 1.05, word-classifier F1 0.19 (0.81 on the real speech), speaker accuracy
0.63 (two speakers; 1.0 on the real speech): a model this small and briefly trained gets
the rhythm and timbre of speech, not yet its words or the prompt's voice.
``DIR/tts_eval/`` also holds the generated WAVs and the file lists the common evaluation
scripts read.

``configs/tts_tiny.py:runlocal``: the same stages on 12 + 8 utterances with models of a few
thousand parameters and two steps of each training stage (the suite's speech run; well
under a minute), for checking a change end to end. Its numbers mean nothing.
"""

from resgen_jax import config_base


def get_config(variant: str = ""):
  """The embedded speech run, or (``variant="runlocal"``) its shrink: see the module
  docstring."""
  shrink = config_base.config_variant("tts_tiny", variant)
  config = config_base.base_config("speech")
  config.stages = ("tokenizer", "encode", "generator", "evaluate")
  data = config.data
  data.name = "espeak"
  data.train_split, data.eval_split = "train", "test"
  data.min_seconds, data.max_seconds = 0.5, 4.0
  # 16 training speakers: with the corpus default of 6, the held-out loss on the unseen
  # voices was 23.7 after 2000 steps; with these 16 it is 21.7.
  data.espeak.train_voices = ("en+m1", "en+m2", "en+m3", "en+m4", "en+m6", "en+m7", "en+f1",
                              "en+f2", "en+f3", "en+f4", "en-us+m2", "en-us+m3", "en-us+f1",
                              "en-us+f2", "en+klatt", "en+klatt2")
  data.espeak.train_utterances = 1600
  data.espeak.eval_utterances = 64
  data.espeak.min_words, data.espeak.max_words = 2, 6

  tok = config.tokenizer
  tok.model.channels = 64
  tok.model.channel_multipliers = (1, 2, 2)  # 4x fewer frames: 62.5 -> 15.6 per second
  tok.model.num_res_blocks = 1
  tok.model.latent_dim = 16
  tok.model.norm_groups = 8
  tok.quantizer.depth = 8
  tok.quantizer.codebook_size = 256
  tok.quantizer.dropout_prob = 0.5  # every depth prefix decodes (error by depth)
  tok.crop_frames = 64
  tok.train.batch_size = 32
  tok.train.num_steps = 800
  tok.train.learning_rate = 2e-3
  tok.train.log_every = 100
  tok.train.eval_every = 400
  tok.train.checkpoint_every = 400
  tok.train.eval_batch_size = 64

  gen = config.generator
  gen.model.width = 128
  gen.model.num_layers = 4
  gen.model.num_heads = 4
  gen.model.text_layers = 2
  gen.model.text_mode = "cross"
  gen.loss.prompt_prob = 0.5
  gen.train.batch_size = 32
  gen.train.num_steps = 2000
  gen.train.learning_rate = 1e-3
  gen.train.warmup_steps = 100
  gen.train.log_every = 100
  gen.train.eval_every = 1000
  gen.train.checkpoint_every = 1000
  gen.train.eval_batch_size = 64
  gen.train.ema_decay = 0.998
  config.text.max_length = 64

  config.sampler.steps = 16
  config.sampler.cfg_scale = 2.0
  config.synth.batch_size = 16
  config.evaluation.tts_prompt_seconds = 1.0
  config.evaluation.tts_classifier_steps = 1500  # word F1 on real unseen voices: 0.66 at 1000
  if shrink:
    runlocal(config)
  return config


def runlocal(config) -> None:
  """Shrinks ``config`` to a few utterances, tiny models and two steps of each stage."""
  config.data.espeak.update(train_utterances=12, eval_utterances=8)
  config.data.max_seconds = 3.0
  tok = config.tokenizer
  tok.model.update(channels=8, latent_dim=8)
  tok.quantizer.update(depth=4, codebook_size=16)
  tok.crop_frames = 32
  tok.train.update(batch_size=8, num_steps=2, warmup_steps=1, eval_batch_size=8)
  gen = config.generator
  gen.model.update(width=32, num_layers=1, num_heads=2, text_layers=1, num_components=4,
                   low_rank=4)
  gen.train.update(batch_size=8, num_steps=2, warmup_steps=1, eval_batch_size=8)
  config.sampler.steps = 3
  config.synth.batch_size = 4
  config.evaluation.update(tts_classifier_steps=3, tts_prompt_seconds=0.5)
