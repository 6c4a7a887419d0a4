"""The ``evaluate`` stage: the sample set of ``config.sampler`` scored once against the
held-out split in the features of ``evaluation.extractor``
(``DIR/samples/<tag>_eval.json``)."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from resgen_jax import data as data_lib
from resgen_jax.evaluation import classifier, fid
from resgen_jax.evaluation import features as features_lib
from resgen_jax.evaluation import metrics as metrics_lib
from resgen_jax.stages import encode, extractors, sample
from resgen_jax.train import preemption
from resgen_jax.utils import files


def run(config, workdir: str, mesh) -> dict:
  """Scores the sample set of ``config.sampler`` and writes ``DIR/samples/<tag>_eval.json``
  once (an existing one is kept). ``evaluation.extractor`` picks the features:

  * ``classifier``: a classifier trained by the project on the data set's own labels (no
    download): class agreement of the samples, and Frechet distance, precision and recall
    in its feature space against the held-out split; the same for real held-out images;
  * ``inception``: the FID Inception (weights from ``evaluation.inception_weights``): FID,
    Inception Score and precision/recall against ``evaluation.reference_stats`` or the
    held-out split, streaming the samples in batches.
  """
  del mesh
  samples = sample.samples_path(config, workdir)
  out = os.path.splitext(samples)[0] + "_eval.json"
  if not os.path.exists(samples):
    raise FileNotFoundError(f"no samples at {samples}; run the 'sample' stage first")
  steps = sample.check_sample_provenance(samples, workdir)
  encode.check_token_data(config, workdir)
  settings = extractors.evaluation_settings(config.evaluation)
  if os.path.exists(out):
    with open(out) as f:
      report = json.load(f)
    if extractors.saved_settings(report, settings) != settings:
      raise ValueError(
          f"{out} was computed with evaluation settings {report.get('evaluation')}, not "
          f"{settings}; it is kept as it is: move it away to evaluate again")
    return report
  report = {}
  if jax.process_index() == 0:  # host-side and local-device work only
    evaluate = (_evaluate_with_inception if config.evaluation.extractor == "inception"
                else _evaluate_with_classifier)
    report = dict(evaluate(config, workdir, samples), samples=samples, evaluation=settings,
                  **steps)
    files.save_json(out, report)
    for name in ("generated", "real_heldout"):
      logging.info("%s: %s", name, ", ".join(f"{k} {v:.4g}"
                                             for k, v in report.get(name, {}).items()))
  return report


def _evaluate_with_classifier(config, workdir: str, samples: str) -> dict:
  """Class agreement, Frechet distance and precision/recall in the features of a classifier:
  the project's (``classifier``) or a pretrained one (``resnet``)."""
  classes = config.data.num_classes
  real_images, real_labels = data_lib.load_all(config.data, config.data.eval_split)
  train_images, _ = data_lib.load_all(config.data, config.data.train_split)
  evaluator = classifier.ClassifierEvaluator(
      None, classes, real_images, real_labels, baseline_images=train_images,
      extractor=extractors.feature_extractor(config, workdir))
  with np.load(samples, allow_pickle=False) as data:
    labels = data["labels"]
  generated = evaluator.evaluate_batches(preemption.checked(
      fid.npz_member_batches(samples, "arr_0", config.evaluation.batch_size), agree=False),
                                         labels)
  return {"num_samples": int(labels.shape[0]), "generated": generated,
          "real_heldout": evaluator.reference()}


def _evaluate_with_inception(config, workdir: str, samples: str) -> dict:
  ecfg = config.evaluation
  extract = extractors.feature_extractor(config, workdir)
  features, logits = features_lib.extract(extract, preemption.checked(
      fid.npz_member_batches(samples, "arr_0", ecfg.batch_size), agree=False))
  report = {"num_samples": int(features.shape[0])}
  if ecfg.reference_stats:
    reference = fid.load_reference(ecfg.reference_stats)
  else:
    real_features, real_logits = extractors.heldout_features(config, extract)
    reference = features_lib.Reference.from_features(real_features)
    splits = min(metrics_lib.IS_SPLITS, real_features.shape[0])
    report["real_heldout"] = dict(zip(("inception_score", "inception_score_std"),
                                      metrics_lib.inception_score(real_logits, splits)))
  report["generated"] = fid.score(features, logits, reference)
  return report
