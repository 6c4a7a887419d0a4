"""The ``sample`` stage: ``sampler.samples_per_class`` images of every class drawn into
``DIR/samples/<tag>.npz`` with a PNG grid per class, streamed to disk batch by batch."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Optional

import jax
import numpy as np

from resgen_jax import config_checks
from resgen_jax.stages import generator, sampling, tokenizer
from resgen_jax.train import preemption, trainer
from resgen_jax.utils import files
from resgen_jax.utils import images as image_utils

SAMPLES_DIR = "samples"
GRID_COLUMNS = 8  # images per row of the sample grids
GRID_MAX_IMAGES = 64  # images in a class's grid (the first ones drawn)


def sample_tag(scfg, generator_step: Optional[int] = None) -> str:
  """The sample set's name: ``sampler.tag``, or its main settings plus a hash of all of
  them and the generator step it is drawn from (``_g<step>``), so another sampler setting
  or a generator trained further makes a new set instead of reusing an old one."""
  if scfg.tag:
    return scfg.tag
  step = "" if generator_step is None else f"_g{generator_step}"
  settings = files.settings_hash({k: v for k, v in scfg.to_dict().items() if k != "tag"})
  return (f"T{scfg.steps}_cfg{scfg.cfg_scale:g}_temp{scfg.temperature:g}_"
          f"topp{scfg.top_p:g}_conf{scfg.confidence_temperature:g}_seed{scfg.seed}_"
          f"{settings}{step}")


def trained_steps(workdir: str) -> dict:
  """``{"generator_step", "tokenizer_step"}``: the newest checkpoints' steps (None where a
  stage has none), what a sample set is drawn from."""
  return {f"{stage}_step": trainer.latest_checkpoint_step(os.path.join(workdir, stage))
          for stage in ("generator", "tokenizer")}


def samples_path(config, workdir: str) -> str:
  step = trained_steps(workdir)["generator_step"]
  return os.path.join(workdir, SAMPLES_DIR, sample_tag(config.sampler, step) + ".npz")


def check_sample_provenance(path: str, workdir: str) -> dict:
  """The steps a sample set records; a ValueError when its generator or tokenizer is not
  the workdir's newest (a set named by ``sampler.tag`` outlives further training)."""
  current = trained_steps(workdir)
  with np.load(path, allow_pickle=False) as data:
    recorded = {k: int(data[k]) for k in current if k in data.files}
  stale = {k: (recorded[k], current[k]) for k in recorded if recorded[k] != current[k]}
  if stale:
    what = ", ".join(f"{k.split('_')[0]} step {a} (now {b})" for k, (a, b) in stale.items())
    raise ValueError(f"{path} was drawn from {what}: it is not a sample of the current "
                     f"models and is kept as it is; move it away or set another "
                     f"sampler.tag to draw a new set")
  return recorded


def run(config, workdir: str, mesh) -> str:
  """Draws ``sampler.samples_per_class`` images of every class; writes
  ``DIR/samples/<tag>.npz`` (``arr_0`` uint8 [N,H,W,C], the layout of the standard
  ImageNet evaluator; ``labels``; ``codes``; ``seconds_per_image``) and a PNG grid per class
  (its first GRID_MAX_IMAGES) under ``DIR/samples/<tag>/``. Images go to disk batch by
  batch, so a 50,000-image set is never in memory. An existing sample set is kept."""
  scfg = config.sampler
  path = samples_path(config, workdir)
  if os.path.exists(path):
    check_sample_provenance(path, workdir)
    logging.info("samples exist: %s", path)
    return path
  config_checks.check_sample_counts(scfg)  # also checked at start-up; callers may skip run
  tok_task, tok_state = tokenizer.load(config, workdir, mesh)
  gen_task, gen_state = generator.load(config, workdir, mesh)
  sample = sampling.compiled_image_sampler(config, tok_task, tok_state, gen_task, gen_state, mesh)
  labels = np.repeat(np.arange(config.data.num_classes), scfg.samples_per_class)
  size, (h, w) = config.data.image_size, tok_task.tok.grid_shape(config.data.image_size)
  channels = tok_task.tok.autoencoder.image_channels
  writer = process_zero_npz(path, arr_0=((len(labels), size, size, channels), np.uint8),
                            labels=((len(labels),), np.int32),
                            codes=((len(labels), h, w, gen_task.depth), np.int32))
  seconds = 0.0
  with writer as out:
    for index, chunk in preemption.checked(sampling.label_batches(labels, scfg.batch_size)):
      start = time.time()
      images, codes, _ = sample(gen_state, chunk, index)
      seconds += time.time() - start
      first = index * scfg.batch_size
      if out is not None:
        out["arr_0"][first:first + len(chunk)] = images
        out["codes"][first:first + len(chunk)] = codes
    if out is not None:
      out["labels"][:] = labels
      out.small["seconds_per_image"] = np.float64(seconds / len(labels))
      out.small.update({k: np.int64(v) for k, v in trained_steps(workdir).items()})
      tag_dir = os.path.splitext(path)[0]
      for c in range(config.data.num_classes):
        rows = np.flatnonzero(labels == c)[:GRID_MAX_IMAGES]
        image_utils.save_png(os.path.join(tag_dir, f"class_{c:04d}.png"),
                             image_utils.grid(out["arr_0"][rows], GRID_COLUMNS))
  logging.info("wrote %d samples to %s in %.1f s (%.2f ms per image, compile excluded)",
               len(labels), path, seconds, 1e3 * seconds / len(labels))
  return path


def process_zero_npz(path: str, **specs):
  """A :class:`files.StreamingNpz` on process 0; elsewhere a context that yields None."""
  if jax.process_index() == 0:
    return files.StreamingNpz(path, **specs)
  return contextlib.nullcontext()
