"""The stages of a run, each resumable, run in the order a config lists (``config.stages``)
by :func:`run`; one module per stage:

  ``tokenizer`` (:mod:`.tokenizer`): trains the RVQ tokenizer and writes its report.
  ``encode`` (:mod:`.encode`): encodes the train and eval splits once into ``DIR/tokens/``.
  ``generator`` (:mod:`.generator`): trains the generator family on the cached tokens.
  ``sample`` (:mod:`.sample`): draws class-conditional samples into ``DIR/samples/``.
  ``evaluate`` (:mod:`.evaluate`): scores them against the held-out split.

:mod:`.run_config` keeps a workdir to one model config; :mod:`.sampling` is the compiled
sampler and :mod:`.extractors` the evaluation's features, shared by the stages and the API.
A speech config (``config.modality == "speech"``) runs the speech stages of
``audio/stages.py`` under the same names, plus ``synthesize``.

A stage whose results exist is not run again, and nothing it wrote is overwritten.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict

import ml_collections

from resgen_jax import config_base, config_checks
from resgen_jax.stages import encode, evaluate, extractors, generator, run_config, sample
from resgen_jax.stages import tokenizer
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption

STAGES: Dict[str, Callable] = {"tokenizer": tokenizer.run, "encode": encode.run,
                               "generator": generator.run, "sample": sample.run,
                               "evaluate": evaluate.run}


def run(config: ml_collections.ConfigDict, workdir: str, stages=None) -> None:
  """Runs ``stages`` (default ``config.stages``) in order in ``workdir``."""
  stages = tuple(config.stages if stages is None else stages)
  config_base.check_modality(config.modality)
  table = STAGES
  if config.modality == "speech":
    from resgen_jax.audio import stages as speech_stages  # pylint: disable=g-import-not-at-top
    table = speech_stages.STAGES
  unknown = [s for s in stages if s not in table]
  if unknown:
    raise ValueError(f"unknown stages {unknown} for a {config.modality} config (data.name="
                     f"{config.data.name!r}); known: {sorted(table)}")
  config_checks.check_config(config, stages)  # before anything is written or trained
  if "evaluate" in stages and table is STAGES:
    extractors.check_evaluation_data(config)
  if "generator" in stages and config.generator.family not in generator.FAMILIES:
    raise ValueError(f"generator.family must be one of {sorted(generator.FAMILIES)}, got "
                     f"{config.generator.family!r}")
  os.makedirs(workdir, exist_ok=True)
  steps_before = run_config.checkpoint_steps(workdir)
  previous = run_config.write_run_config(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  try:
    with preemption.watch():  # every stage's loops stop within a batch of a SIGTERM
      for stage in stages:
        logging.info("stage %s", stage)
        table[stage](config, workdir, mesh)
  except preemption.Preempted:
    # Not a failure: what had finished is on disk (nothing half-written), a rerun resumes.
    logging.warning("preempted during the %s stage; rerun the same command to resume", stage)
    raise SystemExit(preemption.EXIT_CODE) from None
  except Exception:
    # A refused or failed run that trained nothing leaves the run's record as it was: an
    # evaluation refused for its settings must not record them, and a workdir without
    # config.json whose checkpoints another config wrote must not get this one's (it would
    # then refuse the right config). Once a checkpoint is written the new record stays.
    if run_config.checkpoint_steps(workdir) == steps_before:
      run_config.restore_run_config(workdir, previous)
    raise
