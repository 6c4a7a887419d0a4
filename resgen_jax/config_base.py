"""The config schema every experiment config starts from.

Each file under ``configs/`` calls :func:`base_config` and changes what its experiment
needs; any field can then be overridden on the command line, e.g.
``--config.tokenizer.quantizer.depth=16``. Field comments say what each field means.

The schema is composed by modality: ``base_config("image")`` (the default) holds the common
sections, ``base_config("speech")`` adds the speech fields of :func:`speech_fields` (the
``audio``, ``text`` and ``synth`` sections, the corpus, codec-crop and zero-shot-evaluation
fields), so an image run's ``config.json`` holds no speech field and an image config never
loads the speech front end.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Iterable

import ml_collections

from resgen_jax.data import sources

MODALITIES = ("image", "speech")  # config.modality: which stages and data a run has

# Fields (or whole sections) that may differ between a run's saved config.json and the
# config that resumes it: they change how verbosely a run goes, where its data lives, or how
# it samples, not what it trains. (num_steps is not among them: it shapes the learning-rate
# schedule, so a run resumed with another value would not be the run it claims to be.)
RESUMABLE_FIELDS = (
    "stages",
    "mesh",  # a checkpoint restores onto any mesh and layout
    "tokenizer.train.log_every",
    "tokenizer.train.eval_every",
    "tokenizer.train.eval_examples",
    "tokenizer.train.checkpoint_every",
    "tokenizer.train.keep_checkpoints",
    "tokenizer.train.async_checkpoints",
    "tokenizer.train.profile_steps",
    "tokenizer.encode_chunk_batches",  # encoding resumes from any chunk size
    "generator.train.log_every",
    "generator.train.eval_every",
    "generator.train.eval_examples",
    "generator.train.checkpoint_every",
    "generator.train.keep_checkpoints",
    "generator.train.async_checkpoints",
    "generator.train.profile_steps",
    "sampler",
    "synth",
    "evaluation",
    "data.data_dir",
    "data.path",
    "data.eval_path",
    "data.download",
    "data.workers",  # how images are decoded, not which
)


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Optimizer, schedule, batch and bookkeeping of one training stage."""
  cfg = ml_collections.ConfigDict(dict(
      batch_size=64,  # global batch (all processes and devices together)
      grad_accum_steps=1,  # micro-batches per step (generator only): 1/k the activations
      num_steps=1000,  # optimizer steps of this stage
      learning_rate=1e-3,  # peak learning rate after warmup
      lr_min_ratio=0.1,  # final learning rate as a fraction of the peak (cosine decay)
      warmup_steps=50,  # linear warmup steps
      weight_decay=0.0,  # AdamW decoupled weight decay
      b1=0.9,  # Adam beta1
      b2=0.99,  # Adam beta2
      grad_clip=1.0,  # clip by global norm; 0 disables
      ema_decay=0.0,  # EMA of parameters for evaluation/sampling; 0 disables
      log_every=50,  # steps between train metric rows (mean over the interval)
      eval_every=500,  # steps between evaluations; 0 evaluates only at the end
      eval_examples=0,  # examples per evaluation; 0 means the whole eval split
      eval_batch_size=256,  # global batch size of evaluation / encoding passes
      checkpoint_every=500,  # steps between checkpoints (also at the end and on SIGTERM)
      keep_checkpoints=2,  # how many checkpoints to keep
      async_checkpoints=True,  # save in the background while training continues
      profile_steps=0,  # >0: a profiler trace of this many steps after the first (which
                        # compiles), in <workdir>/<stage>/profile (train/profiling.py)
  ))
  cfg.update(overrides)
  return cfg


def tokenizer_config() -> ml_collections.ConfigDict:
  """RVQ tokenizer (method.md section 1). Defaults are a small model; configs scale it."""
  return ml_collections.ConfigDict(dict(
      model=dict(
          channels=32,  # base channel count of the conv encoder/decoder
          channel_multipliers=(1, 2, 2),  # per level; downsampling 2**(len-1)
          num_res_blocks=1,  # residual blocks per level
          latent_dim=16,  # d_z, width of the quantized latent
          norm_groups=8,  # GroupNorm groups (must divide every channel count)
          mid_attention=False,  # self-attention at the lowest resolution (RQ-VAE: True)
          dtype="float32",  # compute dtype: float32 or bfloat16 (parameters stay float32)
      ),
      quantizer=dict(
          depth=4,  # D, residual quantization stages
          codebook_size=64,  # V, codes per book
          shared_codebook=False,  # one book for every depth (RQ-VAE) or one per depth
          ema_decay=0.99,  # EMA decay of the codebook statistics
          ema_eps=1e-5,  # Laplace smoothing of the EMA cluster sizes
          dead_code_threshold=0.1,  # restart codes whose EMA count falls below; 0 disables
          commitment_weight=0.25,  # weight of ||z - sg(partial sums)||^2
          kmeans_init=True,  # k-means codebooks from the first batch
          kmeans_iters=10,  # Lloyd iterations of that initialisation
          dropout_prob=0.0,  # quantizer dropout: prob. of training with a random depth
          init_scale=1.0,  # std of random initial codebooks (before k-means/restarts)
      ),
      # image encode stage: batches (of train.eval_batch_size) per token file written as it
      # goes, the most encoding a preemption loses (ImageNet, batch 256: 12,800 images)
      encode_chunk_batches=50,
      loss=dict(
          recon="l2",  # reconstruction loss: l1 or l2
          recon_weight=1.0,  # weight of the reconstruction loss
          perceptual_weight=0.0,  # LPIPS weight; needs perceptual_weights
          perceptual_weights="",  # path of an LPIPS .npz (see codec/losses.py for the format)
          gan_weight=0.0,  # hinge-GAN generator weight; 0 disables the discriminator
          gan_start_step=0,  # GAN losses are off before this step
          disc_channels=64,  # PatchGAN base channels
          disc_layers=3,  # PatchGAN strided blocks
      ),
      train=train_config(),
  ))


def generator_config() -> ml_collections.ConfigDict:
  """The ResGen generator (method.md sections 2-4) or a baseline on the same tokens.
  Defaults are a small model."""
  return ml_collections.ConfigDict(dict(
      # resgen (the mixture head over hidden sums), direct (same masked backbone and schedule,
      # a softmax per hidden depth: MaskGIT-style), or rq_transformer (autoregressive over
      # positions, then depths: Lee et al. 2022). Same trainer, checkpoints, CLI, evaluation.
      family="resgen",
      # how many depths of the cached codes to model (0: all): generators of depth 4, 8 and
      # 16 can share one depth-16 tokenizer trained with quantizer dropout, so they differ
      # only in what they generate (bench/study.py)
      token_depth=0,
      model=dict(
          width=128,  # transformer width
          num_layers=4,  # transformer blocks
          num_heads=4,  # attention heads
          mlp_ratio=4,  # MLP hidden width / width
          num_components=16,  # K, mixture components per position
          low_rank=16,  # r, rank of the mean projection (width -> K x r -> d)
          dropout=0.0,  # dropout in attention and MLP
          remat=False,  # rematerialise blocks in the backward pass (memory for compute)
          remat_policy="",  # what remat may save: "" nothing, or a jax.checkpoint_policies name
          scan_layers=False,  # blocks under nn.scan: compile time independent of depth
          dtype="float32",  # compute dtype: float32 or bfloat16 (parameters stay float32)
          # speech: how the transcript conditions the network (generator/model.py): cross
          # (cross-attention in every block) or prefix (text encodings before the tokens)
          text_mode="cross",
          text_layers=2,  # speech: blocks of the text encoder
          max_positions=0,  # speech: token frames (prompt + target); 0: from data.max_seconds
      ),
      rq=dict(  # family=rq_transformer: model.* sizes the spatial transformer
          depth_layers=2,  # layers of the depth transformer run at every position
      ),
      loss=dict(
          kind="jensen",  # jensen (the paper's cls + reg split) or nll (exact mixture NLL)
          schedule="cosine",  # masking schedule gamma: cosine | linear | square | cubic | sqrt
          sigma=0.5,  # mixture standard deviation (in normalised target units)
          learn_sigma=False,  # learn sigma (a scalar) instead of fixing it
          # with learn_sigma: one sigma per hidden count k (fine tails are near-unpredictable
          # and want a wide sigma, fully hidden positions a narrow one)
          sigma_per_count=False,
          target_norm=True,  # divide targets by their RMS per hidden count k (from data)
          # weight of a scored position in the loss: position (each position with hidden
          # tokens weighs 1, the paper's sum over positions) or tokens (it weighs its hidden
          # count k, so every hidden token counts the same, as in the direct baseline's cross
          # entropy, and fully hidden positions outweigh near-unpredictable fine tails).
          # MNIST D4 (README): Frechet 228 -> 192 with tokens (seed 0); with sampler
          # temperature 0.5, 138 over seeds 0-2 against direct's best 167; D8 205 vs 245
          # (seeds 0-1), D16 318 vs 539 (seed 0). Kept at the paper's until the digits
          # default is measured with it
          position_weight="position",
          cond_dropout=0.1,  # probability of the null class (and null text) in training (CFG)
          # speech: share of examples trained with a wholly visible prefix (a prompt) of up to
          # prompt_max_fraction of their frames, as zero-shot synthesis conditions on one
          prompt_prob=0.0,
          prompt_max_fraction=0.5,
      ),
      train=train_config(learning_rate=5e-4, weight_decay=0.01, b2=0.98, ema_decay=0.999),
  ))


def sampler_config() -> ml_collections.ConfigDict:
  """The reverse process (method.md section 5) and what --mode=sample writes."""
  return ml_collections.ConfigDict(dict(
      steps=8,  # T, network calls (2T with CFG), independent of the depth D
      schedule="cosine",  # gamma for how many tokens stay hidden after each step
      cfg_scale=1.0,  # classifier-free guidance w; 1 = conditional only (one call/step)
      cfg_ramp="constant",  # constant w, or linear from 1 to w over the steps (RQ: the draws)
      # temperature of the component choice; 0 = most probable. MNIST D4 (README): 0.5
      # beats 1 by far (Frechet 138 vs 192 over seeds 0-2, position_weight=tokens), 0
      # loses recall
      temperature=1.0,
      top_p=1.0,  # nucleus over mixture components (baselines: over tokens)
      top_k=0,  # baselines: keep the k most probable tokens; 0 keeps all
      confidence_temperature=1.0,  # Gumbel noise scale tau on the confidences, x (1 - t/T)
      mean_noise=0.0,  # std of Gaussian noise added to the chosen mean (embedding units)
      # ResGen: a candidate token's confidence, codebook (softmax over raw squared distances)
      # or mixture (the same over 2 sigma_k^2, the model's own scale): generator/sampler.py
      confidence="codebook",
      # each (every token its own confidence, cumulative minimum along depth) or first (a
      # position's first hidden token's for all its hidden tokens: positions revealed
      # whole, every depth from one joint proposal). Which is better depends on the depth
      # (README, "ResGen against the baselines"): on digits at depth 16 first halves the
      # Frechet distance (14.8 vs 30.2 at 1000 steps, 12.6 vs 23.7 at 3000), while the
      # digits default (its own depth-4 tokenizer, 2500 steps) is better with each (12.4 vs
      # 14.8, seeds 0-2, 2000 samples). Deep configs set first.
      confidence_depths="each",
      # ResGen: noise on the chosen mean in units of the model's sigma (1: a draw from the
      # component's Gaussian, not its mean), on top of mean_noise
      sigma_noise=0.0,
      guide_means=True,  # ResGen with CFG: guide the means too (False: the logits only)
      # the network's compute dtype while sampling: "" (as trained), float32 or bfloat16
      # (parameters stay float32; bf16 vs float32 tokens: README, "Speed ... latency")
      dtype="",
      samples_per_class=16,  # --mode=sample draws this many images of every class
      batch_size=256,  # samples per jitted sampler call
      seed=0,  # sampling seed
      tag="",  # name of the sample set; empty: derived from steps / cfg / temperatures
  ))


def synth_config() -> ml_collections.ConfigDict:
  """Zero-shot speech synthesis (``--mode=synthesize``, audio/synthesis.py)."""
  return ml_collections.ConfigDict(dict(
      text="",  # what to say
      prompt_wav="",  # a WAV of the voice to speak it in (about 3 s; 16-bit PCM, any rate)
      prompt_text="",  # the prompt's transcript
      seconds=0.0,  # length of the generated speech; 0: the prompt's speaking rate
      # batch synthesis: a TSV of prompt_wav<TAB>prompt_text<TAB>text[<TAB>name] rows
      manifest="",
      output="",  # WAV path (one text) or directory (manifest); "": under DIR/synth/
      batch_size=8,  # utterances per sampler call
  ))


def base_config(modality: str = "image") -> ml_collections.ConfigDict:
  """Every field of a run of ``modality`` (image | speech), with small defaults."""
  check_modality(modality)
  config = ml_collections.ConfigDict(dict(
      modality=modality,  # image | speech: the schema's sections and the stages' kind
      seed=0,  # root seed; each stage folds its name in
      stages=("tokenizer", "encode"),  # what --mode=train runs, in order
      mesh=dict(
          axes=("data",),  # mesh axis names among data | fsdp | tensor (see train/mesh.py)
          shape=(-1,),  # sizes; -1 = all remaining devices
          # ((path regex, (mesh axis or None per dimension)), ...): how state leaves are
          # split; the first match wins; unmatched leaves go over fsdp (largest dimension).
          rules=(),
          fsdp_min_size=2 ** 14,  # leaves smaller than this stay replicated under fsdp
          # ((logical activation axis, mesh axis / axes / None), ...) for the training step
          activation_rules=(("batch", ("data", "fsdp")), ("length", None), ("embed", None),
                            ("mlp", "tensor")),
      ),
      data=dict(
          name="digits",  # digits | npz | folder | mnist | cifar10 | imagenet2012
          path="",  # npz file or image folder (train split) for npz / folder
          eval_path="",  # npz file or folder for the eval split (default: path)
          data_dir=None,  # TFDS data_dir
          download=False,  # let TFDS download (never at test time)
          image_size=16,  # images are resized / center-cropped to this size
          num_classes=10,  # labels must lie in [0, num_classes)
          random_flip=False,  # random horizontal flips in training
          train_split="train",  # split names
          eval_split="test",
          shuffle_buffer=10_000,  # streaming (imagenet2012) shuffle buffer
          # folder source: image-decoding processes (0: in the training process; -1: one
          # per host core); the imagenet2012 stream decodes with tf.data's autotuning
          workers=0,
      ),
      tokenizer=tokenizer_config(),
      generator=generator_config(),
      sampler=sampler_config(),
      evaluation=dict(
          # features: "classifier" (trained on the data set's own labels; no download),
          # "inception" (the FID Inception: FID, Inception Score, precision/recall) or
          # "resnet" (a pretrained CIFAR ResNet from resnet_weights: an independent scorer)
          extractor="classifier",
          classifier_steps=800,  # training steps of that classifier (once per workdir)
          # how its last feature map becomes the features: "mean" (global average pooling)
          # or "flatten" (evaluation/classifier.py: "mean" stays below 0.98 on MNIST)
          classifier_pool="mean",
          inception_weights="",  # .npz of the FID Inception (evaluation/inception.py)
          resnet_weights="",  # .npz state dict of a CIFAR ResNet (evaluation/resnet.py)
          reference_stats="",  # .npz with mu, sigma[, activations]; "" = data.eval_split
          batch_size=200,  # images per extractor call
          # Frechet distance of proxy_samples samples (config.sampler) to the held-out split
          # every proxy_every generator steps, logged as train/fid_proxy; 0 disables
          proxy_every=0,
          proxy_samples=500,
          # the proxy's real side: the first proxy_reference_examples held-out images (0: the
          # whole split), computed once per generator run on every process; with the
          # inception extractor, reference_stats replaces them when given
          proxy_reference_examples=0,
          tokenizer_rfid=True,  # reconstruction FID per depth prefix in the tokenizer report
          # held-out images of that rFID (0: the whole split); the extractor sees each D + 1
          # times (the image and its D prefix reconstructions)
          tokenizer_rfid_examples=0,
      ),
  ))
  if modality == "speech":
    for dotted, value in speech_fields().items():
      *parents, name = dotted.split(".")
      section = config
      for part in parents:
        section = section[part]
      section[name] = value
  return config


# The dotted fields only a speech run has (the keys of speech_fields(), named here so that
# comparing an image run's config never imports the speech code that gives their defaults).
SPEECH_FIELDS = ("data.min_seconds", "data.max_seconds", "data.max_utterances", "data.espeak",
                 "audio", "text", "synth", "tokenizer.crop_frames",
                 "evaluation.tts_prompt_seconds", "evaluation.tts_max_utterances",
                 "evaluation.tts_classifier_steps")


def speech_fields() -> dict:
  """The fields only a speech run has (``SPEECH_FIELDS``), by dotted name, with their
  defaults."""
  # Imported here: an image config never loads the speech front end (scipy.signal, eSpeak).
  from resgen_jax.audio import corpus, frontend  # pylint: disable=g-import-not-at-top
  from resgen_jax.audio import text as text_lib  # pylint: disable=g-import-not-at-top
  return {
      # speech sources (name espeak | manifest | librispeech; audio/corpus.py): clips outside
      # [min_seconds, max_seconds] are dropped; max_seconds also sets how many token frames
      # the generator handles (generator.model.max_positions = 0)
      "data.min_seconds": 0.5,
      "data.max_seconds": 20.0,
      "data.max_utterances": 0,  # librispeech: read at most this many per split; 0 = all
      "data.espeak": corpus.speech_data_config().espeak,  # the embedded synthetic corpus
      "audio": frontend.audio_config(),  # sample rate, STFT and mel settings, vocoder
      "text": text_lib.text_config(),  # the transcript tokenizer and its length limit
      "synth": synth_config(),
      "tokenizer.crop_frames": 64,  # codec training: mel frames per crop (multiple of f)
      # zero-shot evaluation (audio/evaluation.py): prompt length of the continuation task,
      # target utterances per task (0: every eligible one), classifier training steps
      "evaluation.tts_prompt_seconds": 3.0,
      "evaluation.tts_max_utterances": 0,
      "evaluation.tts_classifier_steps": 600,
  }


def check_modality(modality: str) -> None:
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def modality_of(saved: dict) -> str:
  """The modality of a saved ``config.json``: its ``modality`` field, or for one written
  before the field existed, what its data source is (an image source or a speech one)."""
  if "modality" in saved:
    return saved["modality"]
  return "image" if saved.get("data", {}).get("name") in sources.SOURCE_NAMES else "speech"


RUNLOCAL = "runlocal"  # every config file's shrink: the same stages and code path, tiny sizes


def config_variant(name: str, variant: str) -> bool:
  """Whether ``get_config(variant)`` of ``configs/<name>.py`` asks for the ``runlocal``
  shrink (``--config=configs/<name>.py:runlocal``); any other variant but the default ("")
  is refused naming both."""
  variants = ("", RUNLOCAL)
  if variant not in variants:
    raise ValueError(f"configs/{name}.py knows the variants {variants}, got {variant!r} "
                     f"(use configs/{name}.py or configs/{name}.py:{RUNLOCAL})")
  return variant == RUNLOCAL


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file, as ``--config=path`` would load it (for notebooks,
  benchmarks and tests); ``path:arg`` calls ``get_config(arg)`` (``--config=path:arg``)."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config file at {path}")
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _typed_like(value, like):
  """A value read back from JSON in the type of the field it fills: lists where the
  config has tuples (or no field) become tuples, nested ones too; sections are rebuilt
  field by field."""
  if isinstance(value, dict):
    section = like if isinstance(like, ml_collections.ConfigDict) else ml_collections.ConfigDict()
    for key, item in value.items():
      section[key] = _typed_like(item, section.get(key))
    return section
  if isinstance(value, list) and (like is None or isinstance(like, tuple)):
    return tuple(_typed_like(item, None) for item in value)
  return value


def without_fields(tree: dict, dotted: Iterable[str]) -> dict:
  """``tree`` (nested dicts) less the ``dotted`` fields it has (a copy)."""
  tree = json.loads(json.dumps(tree))
  for name in dotted:
    *parents, leaf = name.split(".")
    section = tree
    for part in parents:
      section = section.get(part, {})
    section.pop(leaf, None)
  return tree


def foreign_fields(modality: str) -> tuple:
  """The dotted fields another modality has and ``modality`` lacks: what a ``config.json``
  written before the schema was split by modality holds beyond its own (an image run's
  speech fields), ignored when it is read and compared."""
  return SPEECH_FIELDS if modality == "image" else ()


def config_from_json(saved: dict) -> ml_collections.ConfigDict:
  """A run's ``config.json`` (written by the stages) back as the config it came from: the
  base config of its modality with every saved value in place, in the field's type. Fields
  a newer version added keep their defaults; another modality's fields that an older
  version wrote are dropped."""
  modality = modality_of(saved)
  check_modality(modality)
  saved = without_fields(dict(saved, modality=modality), foreign_fields(modality))
  return _typed_like(saved, base_config(modality))
