"""Command-line entry point.

    python -m resgen_jax.main --config=configs/digits.py --workdir=DIR [--mode=train]

``--mode=train`` runs the stages the config lists (``config.stages``); ``--mode=encode``,
``--mode=sample`` and ``--mode=evaluate`` run just that stage with already trained models
(e.g. ``--mode=sample --config.sampler.cfg_scale=2`` for another sample set); speech configs
add ``--mode=synthesize`` (``--config.synth.text``, ``--config.synth.prompt_wav``,
``--config.synth.prompt_text``). Any config field can be overridden, e.g.
``--config.tokenizer.quantizer.depth=16``. Rerunning a command resumes where it stopped.
Multi-process runs start the same command in every process (``--coordinator_address``,
``--num_processes``, ``--process_id``; see ``train/distributed.py``).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "encode", "sample", "evaluate", "synthesize"],
    "train: run config.stages; encode: only cache tokens; sample: draw samples with the "
    "trained models (config.sampler); evaluate: score those samples (speech: the zero-shot "
    "tasks); synthesize (speech): say config.synth.text in the voice of "
    "config.synth.prompt_wav, or every row of config.synth.manifest.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process runs: host:port of process 0's coordinator (see train/distributed.py; "
    "detected automatically on SLURM and Cloud TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's id.")
flags.mark_flags_as_required(["config", "workdir"])

MODE_STAGES = {"train": None, "encode": ("encode",), "sample": ("sample",),
               "evaluate": ("evaluate",), "synthesize": ("synthesize",)}


def _hide_gpus_from_tensorflow():
  """TensorFlow (data loading, summaries) must not take accelerator memory from JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _hide_gpus_from_tensorflow()
  import jax  # pylint: disable=g-import-not-at-top
  # Random bits that do not depend on how arrays are sharded: a run draws the same masks,
  # dropout and samples on any mesh and any number of hosts (JAX's default since 0.5,
  # pinned here because resumption on another mesh relies on it).
  jax.config.update("jax_threefry_partitionable", True)
  from resgen_jax import stages  # pylint: disable=g-import-not-at-top
  from resgen_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value,
                                             _PROCESS_ID.value, os.environ))
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  stages.run(_CONFIG.value, _WORKDIR.value, MODE_STAGES[_MODE.value])


if __name__ == "__main__":
  app.run(main)
