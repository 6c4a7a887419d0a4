"""The ``tokenizer`` stage of an image run: trains the RVQ tokenizer (``DIR/tokenizer/``),
then writes its report once: ``results.json`` (PSNR, SSIM and reconstruction FID per depth
prefix on the eval split, codebook usage per depth) and ``reconstructions.png`` (row 1:
originals; row j + 1: reconstruction from the first j depths). :func:`load` gives the
trained tokenizer to the later stages and the API from the workdir alone."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable

import jax
import numpy as np

from resgen_jax import data as data_lib
from resgen_jax.codec.tokenizer import TokenizerTask, prefix_reconstructions
from resgen_jax.evaluation import reconstruction
from resgen_jax.stages import extractors
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption, trainer
from resgen_jax.utils import files
from resgen_jax.utils import images as image_utils

RESULTS_FILE = "results.json"
RECON_FILE = "reconstructions.png"
# DIR/tokenizer/image_spec.json: {"image_size", "image_channels"} of the images the tokenizer
# was trained on, what loading it for inference needs besides its checkpoint (no data).
IMAGE_SPEC_FILE = "image_spec.json"
RECON_EXAMPLES = 8  # columns of the reconstruction grid


def eval_pass(config, split: str, max_examples=None) -> Callable[..., Iterable[dict]]:
  """Returns a factory of sequential passes over ``split`` (local batches with ``valid``),
  ``passes(start_batch=0)``: from that batch on (a resumed encoding).

  A random-access source is loaded once and shared by every pass; a streamed one
  (imagenet2012) is re-opened per pass.
  """
  pid, count = jax.process_index(), jax.process_count()
  batch_size = config.tokenizer.train.eval_batch_size
  if config.data.name in data_lib.sources.STREAMING_SOURCES:
    return lambda start_batch=0: data_lib.eval_batches(
        config.data, split, batch_size, pid, count, max_examples, start_batch)
  source = data_lib.load_source(config.data, split)
  return lambda start_batch=0: data_lib.sequential_batches(
      source, batch_size, pid, count, max_examples, start_batch)


def example_batch(passes: Callable[[], Iterable[dict]], mesh) -> dict:
  """The first batch of a pass (global, without the valid mask), for shapes."""
  local = next(iter(passes()))
  return mesh_lib.global_batch({k: v for k, v in local.items() if k != "valid"}, mesh)


def make_task(config, image_channels: int) -> TokenizerTask:
  task = TokenizerTask(config.tokenizer, image_channels)
  data_lib.check_image_size(config.data.image_size, task.tok.downsample)
  return task


def run(config, workdir: str, mesh) -> None:
  tcfg = config.tokenizer.train
  if tcfg.grad_accum_steps != 1:
    # The quantizer's EMA codebook update and dead-code restarts are per-batch statistics:
    # over micro-batches they would run k times per step on 1/k of the counts.
    raise ValueError(f"tokenizer.train.grad_accum_steps must be 1 (got "
                     f"{tcfg.grad_accum_steps}): the EMA codebook update needs whole batches")
  mesh_lib.check_batch_size(tcfg.batch_size, mesh, tcfg.grad_accum_steps)
  mesh_lib.check_batch_size(tcfg.eval_batch_size, mesh)
  full_eval = eval_pass(config, config.data.eval_split)
  example = example_batch(full_eval, mesh)
  task = make_task(config, example["image"].shape[-1])
  write_image_spec(workdir, config.data.image_size, example["image"].shape[-1])
  train_iter = data_lib.make_train_iterator(config.data, tcfg.batch_size, config.seed,
                                            jax.process_index(), jax.process_count())
  periodic_eval = eval_pass(config, config.data.eval_split, tcfg.eval_examples or None)
  result = trainer.train_and_evaluate(task, tcfg, workdir, train_iter, periodic_eval, mesh,
                                      config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  if result.preempted:
    raise SystemExit(preemption.EXIT_CODE)
  write_report(task, result.state, config, workdir, full_eval, example, mesh)


def write_report(task: TokenizerTask, state, config, workdir: str,
                           full_eval: Callable[[], Iterable[dict]], example: dict,
                           mesh) -> dict:
  """PSNR, SSIM and reconstruction FID (``evaluation.tokenizer_rfid``) per depth prefix
  over the whole eval split, codebook usage per depth, and a reconstruction grid; a report
  that exists is read back, never rewritten."""
  stage_dir = os.path.join(workdir, task.name)
  path = os.path.join(stage_dir, RESULTS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  eval_step = jax.jit(trainer.make_eval_step(task))
  metrics = trainer.evaluate(eval_step, state, task.constants(), full_eval(), mesh)
  depths = range(1, task.tok.depth + 1)
  report = {"step": int(state.step), "eval_split": config.data.eval_split,
            "psnr_by_depth": [metrics[f"psnr_d{j}"] for j in depths]}
  if "ssim_d1" in metrics:  # images of at least SSIM_WINDOW pixels a side
    report["ssim_by_depth"] = [metrics[f"ssim_d{j}"] for j in depths]
  report.update(reconstruction.codebook_usage(task, state, full_eval(), mesh))
  if config.evaluation.tokenizer_rfid:
    if config.evaluation.extractor == "inception" and not config.evaluation.inception_weights:
      logging.warning("no reconstruction FID: evaluation.extractor='inception' needs "
                      "evaluation.inception_weights (or set evaluation.tokenizer_rfid=False)")
    else:
      count = config.evaluation.tokenizer_rfid_examples
      rfid_pass = eval_pass(config, config.data.eval_split, count) if count else full_eval
      report["rfid_by_depth"] = reconstruction.reconstruction_fid(
          task, state, extractors.feature_extractor(config, workdir), rfid_pass(), mesh)
      if count:
        report["rfid_examples"] = count
  # Computed by every process (the parameters are global arrays), written by process 0.
  reconstruct = jax.jit(
      lambda p, b, images: (images[:RECON_EXAMPLES], prefix_reconstructions(
          task.tok, p, b, images[:RECON_EXAMPLES])),
      out_shardings=mesh_lib.replicated(mesh))
  originals, recons = reconstruct(state.params["autoencoder"],
                                  state.model_state["codebook"].codebooks, example["image"])
  if jax.process_index() == 0:
    rows = [np.asarray(originals)] + list(image_utils.to_uint8(recons))
    image_utils.save_png(os.path.join(stage_dir, RECON_FILE),
                         image_utils.grid(np.concatenate(rows), RECON_EXAMPLES))
    files.save_json(path, report)
  for name in ("psnr_by_depth", "ssim_by_depth", "rfid_by_depth", "usage_by_depth",
               "perplexity_by_depth"):
    if name in report:
      logging.info("tokenizer %s: %s", name, ", ".join(f"{v:.3f}" for v in report[name]))
  return report


def image_spec_path(workdir: str) -> str:
  return os.path.join(workdir, TokenizerTask.name, IMAGE_SPEC_FILE)


def write_image_spec(workdir: str, image_size: int, image_channels: int) -> None:
  """Records the image shape the tokenizer trains on (process 0, once)."""
  path = image_spec_path(workdir)
  if jax.process_index() == 0 and not os.path.exists(path):
    files.save_json(path, {"image_size": int(image_size), "image_channels": int(image_channels)})


def read_image_spec(config, workdir: str) -> dict:
  """``{"image_size", "image_channels"}`` of the workdir's tokenizer. A workdir from before
  the spec was recorded falls back to the first eval batch of ``config.data``."""
  path = image_spec_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  logging.warning("%s does not exist (a workdir from an older version): the image shape "
                  "is read from the eval split of config.data", path)
  local = next(iter(eval_pass(config, config.data.eval_split)()))
  return {"image_size": config.data.image_size, "image_channels": local["image"].shape[-1]}


def load(config, workdir: str, mesh):
  """``(task, state)`` of the trained tokenizer, for inference: needs only the workdir (no
  data, no LPIPS file, no optimizer or discriminator state read)."""
  spec = read_image_spec(config, workdir)
  size, channels = spec["image_size"], spec["image_channels"]
  task = make_task(config, channels)
  rows = mesh_lib.example_rows(mesh)
  example = mesh_lib.global_batch(
      {"image": np.zeros((rows, size, size, channels), np.uint8),
       "label": np.zeros((rows,), np.int32)}, mesh)
  state = trainer.load_trained_state(task, config.tokenizer.train, workdir, example, mesh,
                                     config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  return task, state
