"""Start-up checks of a run's config: every stage it will run is checked before any of
them starts, so a bad generator or sampler value fails in a second, not after the
tokenizer has trained for hours (and a refused run writes nothing).

Each check raises a ValueError naming the field. Checks that need data or trained models
(shapes, codebooks, image sizes) stay with the stages that have them.
"""

from __future__ import annotations

import os
from typing import Iterable

import ml_collections

from resgen_jax import config_base
from resgen_jax.data import sources
from resgen_jax.evaluation import classifier, inception, metrics
from resgen_jax.generator import sampler
from resgen_jax.generator.task import check_generator_model

TRAINED_STAGES = {"tokenizer": "tokenizer", "generator": "generator"}  # stage -> section
SAMPLING_STAGES = ("sample", "synthesize", "evaluate")


def check_modality_data(config: ml_collections.ConfigDict) -> None:
  """``modality`` is known and ``data.name`` is a source of that modality."""
  config_base.check_modality(config.modality)
  if config.modality == "speech":
    from resgen_jax.audio import corpus  # pylint: disable=g-import-not-at-top
    names = corpus.SPEECH_SOURCES
  else:
    names = sources.SOURCE_NAMES
  if config.data.name not in names:
    article = "an" if config.modality == "image" else "a"
    raise ValueError(f"data.name={config.data.name!r} is not {article} {config.modality} source "
                     f"(modality={config.modality!r}: one of {names}); a speech config starts "
                     f"from config_base.base_config('speech'), as configs/tts_tiny.py does")


def check_train(cfg: ml_collections.ConfigDict, name: str) -> None:
  """The bookkeeping of one training stage (``<name>.train``)."""
  field = lambda f: f"{name}.train.{f}"
  if cfg.num_steps < 1:
    raise ValueError(f"{field('num_steps')} must be >= 1, got {cfg.num_steps}")
  if not 0 <= cfg.warmup_steps < cfg.num_steps:
    raise ValueError(f"{field('warmup_steps')} ({cfg.warmup_steps}) must be below "
                     f"{field('num_steps')} ({cfg.num_steps}) and >= 0")
  for f in ("log_every", "checkpoint_every", "grad_accum_steps"):
    if cfg[f] < 1:
      raise ValueError(f"{field(f)} must be >= 1, got {cfg[f]}")
  if cfg.keep_checkpoints < 1:  # orbax would delete every checkpoint of the run
    raise ValueError(f"{field('keep_checkpoints')} must be >= 1 (0 would delete every "
                     f"checkpoint), got {cfg.keep_checkpoints}")
  if cfg.profile_steps < 0:
    raise ValueError(f"{field('profile_steps')} must be >= 0 (0: off), got {cfg.profile_steps}")
  if cfg.eval_every < 0 or cfg.eval_examples < 0:
    raise ValueError(f"{field('eval_every')} and {field('eval_examples')} must be >= 0, "
                     f"got {cfg.eval_every} and {cfg.eval_examples}")
  if cfg.learning_rate <= 0:
    raise ValueError(f"{field('learning_rate')} must be positive, got {cfg.learning_rate}")


def check_sample_counts(scfg: ml_collections.ConfigDict) -> None:
  """The image sample stage's counts (``sampler``)."""
  if scfg.samples_per_class < 1 or scfg.batch_size < 1:
    raise ValueError(f"sampler.samples_per_class and sampler.batch_size must be >= 1, got "
                     f"{scfg.samples_per_class} and {scfg.batch_size}")


def check_proxy_samples(count: int) -> None:
  """``evaluation.proxy_samples``: a Frechet distance needs a covariance."""
  if count < 2:
    raise ValueError(f"evaluation.proxy_samples must be >= 2 (a Frechet distance needs a "
                     f"covariance), got {count}")


# What the weight file of each pretrained extractor is (evaluation.<name>_weights).
EXTRACTOR_WEIGHTS = {
    "inception": inception.EXPECTED,
    "resnet": "the path of a CIFAR ResNet state dict (.npz; evaluation/resnet.py)",
}


def check_extractor_weights(ecfg: ml_collections.ConfigDict) -> None:
  """A pretrained ``evaluation.extractor`` has its weight file named, and it exists."""
  if ecfg.extractor not in EXTRACTOR_WEIGHTS:
    return
  path, expected = ecfg[f"{ecfg.extractor}_weights"], EXTRACTOR_WEIGHTS[ecfg.extractor]
  if not path:
    raise ValueError(f"evaluation.extractor={ecfg.extractor!r} needs "
                     f"evaluation.{ecfg.extractor}_weights: {expected} (or leave 'evaluate' "
                     f"out of --config.stages)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"evaluation.{ecfg.extractor}_weights: no file at {path}; "
                            f"expected {expected}")


def check_image_evaluation(config: ml_collections.ConfigDict) -> None:
  """The image evaluation's classifier pool is known, and the sample set is large enough
  for the k-NN metrics (precision/recall need more than ``PR_NEIGHBOURS`` samples)."""
  if config.evaluation.classifier_pool not in classifier.POOLS:
    raise ValueError(f"evaluation.classifier_pool must be one of {classifier.POOLS}, got "
                     f"{config.evaluation.classifier_pool!r}")
  check_extractor_weights(config.evaluation)
  count = config.data.num_classes * config.sampler.samples_per_class
  if count <= metrics.PR_NEIGHBOURS:
    raise ValueError(
        f"sampler.samples_per_class ({config.sampler.samples_per_class}) x "
        f"data.num_classes ({config.data.num_classes}) = {count} samples: the evaluation's "
        f"precision/recall need more than k = {metrics.PR_NEIGHBOURS} of them")


def check_config(config: ml_collections.ConfigDict, stages: Iterable[str]) -> None:
  """Checks the sections of every stage in ``stages``."""
  stages = tuple(stages)
  for stage, section in TRAINED_STAGES.items():
    if stage in stages:
      check_train(config[section].train, section)
  if "generator" in stages:
    check_generator_model(config.generator)
    if config.evaluation.proxy_every < 0:
      raise ValueError(f"evaluation.proxy_every must be >= 0 (0: off), got "
                       f"{config.evaluation.proxy_every}")
    if config.evaluation.proxy_every:
      check_proxy_samples(config.evaluation.proxy_samples)
      reference = config.evaluation.proxy_reference_examples
      if reference < 0 or reference == 1:
        raise ValueError(f"evaluation.proxy_reference_examples must be 0 (the whole held-out "
                         f"split) or >= 2 (a covariance), got {reference}")
  check_modality_data(config)
  image = config.modality == "image"
  if "encode" in stages and config.tokenizer.encode_chunk_batches < 1:
    raise ValueError(f"tokenizer.encode_chunk_batches must be >= 1, got "
                     f"{config.tokenizer.encode_chunk_batches}")
  if image and ("sample" in stages or "evaluate" in stages):
    check_sample_counts(config.sampler)
  if image and "evaluate" in stages:
    check_image_evaluation(config)
  if any(s in stages for s in SAMPLING_STAGES) or (
      "generator" in stages and config.evaluation.proxy_every):
    sampler.check_settings(config.sampler)
