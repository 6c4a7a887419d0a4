"""The feature extractors the evaluation and the training-time FID proxy score images in
(``evaluation.extractor``), with the settings their numbers depend on, and the real
held-out statistics they compare against."""

from __future__ import annotations

import os
from typing import Optional

from resgen_jax import config_checks
from resgen_jax import data as data_lib
from resgen_jax.evaluation import classifier, fid, resnet
from resgen_jax.evaluation import features as features_lib
from resgen_jax.evaluation import metrics as metrics_lib

EVALUATION_DIR = "evaluation"  # DIR/evaluation/: the classifier trained for scoring
EXTRACTOR_SETTINGS = {  # the evaluation fields each feature extractor's numbers depend on
    "classifier": ("extractor", "classifier_steps", "classifier_pool"),
    "inception": ("extractor", "inception_weights", "reference_stats"),
    "resnet": ("extractor", "resnet_weights"),
}


# Settings added after reports were first written, with the value every older report had.
SETTINGS_ADDED = {"classifier_pool": "mean"}


def evaluation_settings(ecfg) -> dict:
  if ecfg.extractor not in EXTRACTOR_SETTINGS:
    raise ValueError(f"evaluation.extractor must be one of {sorted(EXTRACTOR_SETTINGS)}, got "
                     f"{ecfg.extractor!r}")
  classifier.check_pool(ecfg.classifier_pool)
  return {k: ecfg[k] for k in EXTRACTOR_SETTINGS[ecfg.extractor]}


def saved_settings(report: dict, current: dict) -> Optional[dict]:
  """The evaluation settings a report was computed with, completed by SETTINGS_ADDED for
  the fields ``current`` has and an older report lacks."""
  saved = report.get("evaluation")
  if saved is None:
    return None
  return {**{k: v for k, v in SETTINGS_ADDED.items() if k in current}, **saved}


def classifier_params(config, workdir: str):
  """The project's classifier of this workdir (trained on the first call, then read)."""
  ecfg = config.evaluation
  pool = "" if ecfg.classifier_pool == "mean" else f"{ecfg.classifier_pool}_"  # v1 names
  name = f"classifier_{pool}{ecfg.classifier_steps}steps.msgpack"
  return classifier.get_or_train_classifier(
      os.path.join(workdir, EVALUATION_DIR, name), config.data, config.data.num_classes,
      pool=ecfg.classifier_pool, num_steps=ecfg.classifier_steps, seed=config.seed)


def feature_extractor(config, workdir: str) -> features_lib.Extractor:
  """The extractor ``evaluation.extractor`` names (see :mod:`features`)."""
  ecfg = config.evaluation
  evaluation_settings(ecfg)  # validates the name
  config_checks.check_extractor_weights(ecfg)
  if ecfg.extractor == "inception":
    return fid.InceptionFeatures(ecfg.inception_weights)
  if ecfg.extractor == "resnet":
    return resnet.ResNetFeatures(ecfg.resnet_weights, ecfg.batch_size)
  return features_lib.ClassifierFeatures(classifier_params(config, workdir),
                                         config.data.num_classes, ecfg.batch_size,
                                         ecfg.classifier_pool)


def heldout_features(config, extractor: features_lib.Extractor,
                     max_examples: Optional[int] = None):
  """Features and logits of the real images of ``data.eval_split`` (the first
  ``max_examples``; None: all), the same on every process, ``evaluation.batch_size`` images
  at a time."""
  real = (b["image"][b["valid"]] for b in data_lib.eval_batches(
      config.data, config.data.eval_split, config.evaluation.batch_size,
      max_examples=max_examples))
  return features_lib.extract(extractor, real)


def proxy_reference(config, extractor: features_lib.Extractor) -> features_lib.Reference:
  """The FID proxy's real statistics: ``evaluation.reference_stats`` for the Inception
  extractor when given, else the features of the first ``proxy_reference_examples``
  held-out images (0: all)."""
  ecfg = config.evaluation
  if ecfg.extractor == "inception" and ecfg.reference_stats:
    return fid.load_reference(ecfg.reference_stats)
  return features_lib.Reference.from_features(
      heldout_features(config, extractor, ecfg.proxy_reference_examples or None)[0])


def check_evaluation_data(config) -> None:
  """At start-up, before anything trains: the held-out split the evaluation scores against
  has more images than the k of the precision/recall metrics (a random-access source: its
  size is known without a pass; streamed ones are checked when read)."""
  if (config.data.name in data_lib.sources.STREAMING_SOURCES
      or (config.evaluation.extractor == "inception" and config.evaluation.reference_stats)):
    return
  count = data_lib.load_source(config.data, config.data.eval_split).num_examples
  if count <= metrics_lib.PR_NEIGHBOURS:
    raise ValueError(
        f"the held-out split {config.data.eval_split!r} of data.name={config.data.name!r} "
        f"has {count} images: the evaluation's precision/recall need more than "
        f"k = {metrics_lib.PR_NEIGHBOURS}")
