"""Runs the stages a config lists (``config.stages``) in order, each resumable.

Stages:
  ``tokenizer``: trains the RVQ tokenizer (``DIR/tokenizer/``), then writes its report:
      ``results.json`` (PSNR, SSIM and reconstruction FID per depth prefix on the eval
      split, codebook usage per depth) and ``reconstructions.png`` (row 1: originals; row
      j + 1: reconstruction from the first j depths).
  ``encode``: encodes the train and eval splits once into ``DIR/tokens/`` for the generator.
  ``generator``: trains the generator (``generator.family``) on the cached tokens
      (``DIR/generator/``), logging ``train/fid_proxy`` every ``evaluation.proxy_every``.
  ``sample``: draws class-conditional samples into ``DIR/samples/<tag>.npz`` + PNG grids.
  ``evaluate``: scores those samples against the held-out split in the features of
      ``evaluation.extractor`` (``DIR/samples/<tag>_eval.json``).

A stage whose results exist is not run again, and nothing it wrote is overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Callable, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax import config_base, config_checks
from resgen_jax import data as data_lib
from resgen_jax.audio import corpus
from resgen_jax.baselines.direct import DirectTokenTask
from resgen_jax.baselines.rq_transformer import RQTransformerTask
from resgen_jax.codec import rvq, token_cache
from resgen_jax.codec.tokenizer import TokenizerTask, prefix_reconstructions
from resgen_jax.evaluation import classifier, fid, resnet
from resgen_jax.evaluation import features as features_lib
from resgen_jax.evaluation import metrics as metrics_lib
from resgen_jax.generator.task import GeneratorTask, TokenTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption, trainer
from resgen_jax.utils import files
from resgen_jax.utils import images as image_utils

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
RECON_FILE = "reconstructions.png"
# DIR/tokenizer/image_spec.json: {"image_size", "image_channels"} of the images the tokenizer
# was trained on, what loading it for inference needs besides its checkpoint (no data).
IMAGE_SPEC_FILE = "image_spec.json"
RECON_EXAMPLES = 8  # columns of the reconstruction grid
SAMPLES_DIR = "samples"
EVALUATION_DIR = "evaluation"
SETTINGS_HASH_CHARS = 8  # enough to tell sample settings apart, short enough to read
GRID_COLUMNS = 8  # images per row of the sample grids
GRID_MAX_IMAGES = 64  # images in a class's grid (the first ones drawn)


# ----------------------------------------------------------------------------------------
# The run's config: written once, checked on every resume.
# ----------------------------------------------------------------------------------------


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def config_differences(saved: dict, current: dict) -> list:
  """Dotted field names whose values differ (present in either) and are not resumable.

  A field the saved config lacks (added to the schema after that run started) matches when
  the current value is the schema's default: the old run behaved as the default does.
  """
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(current)))
  defaults = _flatten(json.loads(config_base.base_config().to_json()))
  resumable = lambda key: any(key == f or key.startswith(f + ".")
                              for f in config_base.RESUMABLE_FIELDS)
  added_at_default = lambda key: key not in a and key in defaults and b.get(key) == defaults[key]
  return sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and not resumable(k) and not added_at_default(k))


# Config sections that only shape one stage's checkpoints: compared with the saved config
# only once that stage has a checkpoint (a run refused on a bad generator value after the
# tokenizer trained can be rerun with the value corrected).
STAGE_SECTIONS = ("tokenizer", "generator")


def checkpoint_steps(workdir: str) -> tuple:
  """The latest checkpoint step of every trained stage (None where there is none)."""
  return tuple(trainer.latest_checkpoint_step(os.path.join(workdir, s)) for s in STAGE_SECTIONS)


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``DIR/config.json``; refuses a workdir whose run used a different model config
  (the fields of a stage without checkpoints yet may change). Returns the file's previous
  text ("" when there was none), for :func:`run` to put back if the run then fails having
  trained nothing."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = config.to_dict()
  resolved = json.loads(config.to_json())
  previous = ""
  if os.path.exists(path):
    with open(path) as f:
      previous = f.read()
    saved = json.loads(previous)
    untrained = [s for s, step in zip(STAGE_SECTIONS, checkpoint_steps(workdir))
                 if step is None]
    diff = [k for k in config_differences(saved, current)
            if k.split(".")[0] not in untrained]
    if diff:
      raise ValueError(
          f"{workdir} holds a run with a different config (fields: {', '.join(diff)}); "
          f"resuming would mix incompatible checkpoints. Use a new --workdir, or the "
          f"config in {path}.")
    if saved == resolved:  # unchanged: not rewritten (a read-only workdir can be sampled)
      return previous
  if jax.process_index() == 0:
    files.save_json(path, resolved)
  return previous


def restore_run_config(workdir: str, previous: str) -> None:
  """Puts ``config.json`` back as it was before a failed run (removes it if it was new)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  if not previous:
    if os.path.exists(path):
      os.remove(path)
    return
  with files.atomic_write(path) as tmp, open(tmp, "w") as f:
    f.write(previous)


# ----------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------


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


def make_tokenizer_task(config, image_channels: int) -> TokenizerTask:
  task = TokenizerTask(config.tokenizer, image_channels)
  data_lib.check_image_size(config.data.image_size, task.tok.downsample)
  return task


def run_tokenizer(config, workdir: str, mesh) -> None:
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
  task = make_tokenizer_task(config, example["image"].shape[-1])
  write_image_spec(workdir, config.data.image_size, example["image"].shape[-1])
  train_iter = data_lib.make_train_iterator(config.data, tcfg.batch_size, config.seed,
                                            jax.process_index(), jax.process_count())
  periodic_eval = eval_pass(config, config.data.eval_split, tcfg.eval_examples or None)
  result = trainer.train_and_evaluate(task, tcfg, workdir, train_iter, periodic_eval, mesh,
                                      config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  if result.preempted:
    raise SystemExit(preemption.EXIT_CODE)
  write_tokenizer_report(task, result.state, config, workdir, full_eval, example, mesh)


def codebook_usage(task: TokenizerTask, state, batches: Iterable[dict], mesh) -> dict:
  """How the codes of ``batches`` use each depth's codebook: the fraction of codes used
  (``usage_by_depth``) and the perplexity ``exp(entropy)`` of their frequencies
  (``perplexity_by_depth``, at most the codebook size)."""
  encode = jax.jit(task.tok.encode, out_shardings=mesh_lib.replicated(mesh))
  params = state.params["autoencoder"]
  books = state.model_state["codebook"].codebooks
  size, depth = task.tok.codebook_size, task.tok.depth
  counts = np.zeros((depth, size), np.int64)
  for local in preemption.checked(batches):
    batch = mesh_lib.global_batch(local, mesh)
    codes = np.asarray(encode(params, books, batch["image"]))  # [B, h, w, D], whole
    valid = mesh_lib.to_host(batch["valid"], mesh)
    for j in range(depth):
      counts[j] += np.bincount(codes[valid][..., j].ravel(), minlength=size)
  usage = rvq.usage_from_counts(counts.astype(np.float64), xp=np)
  return {"usage_by_depth": [float(u) for u in usage["usage"]],
          "perplexity_by_depth": [float(p) for p in usage["perplexity"]]}


def reconstruction_fid(task: TokenizerTask, state, extractor: features_lib.Extractor,
                       batches: Iterable[dict], mesh) -> list:
  """Frechet distance between the reconstructions from each depth prefix and the images of
  ``batches`` themselves, in the extractor's features (rFID with the FID Inception). -> a
  list of D floats. Reconstructions are scored a batch at a time."""
  reconstruct = jax.jit(lambda p, b, images: prefix_reconstructions(task.tok, p, b, images),
                        out_shardings=mesh_lib.replicated(mesh))
  params, books = state.params["autoencoder"], state.model_state["codebook"].codebooks
  real, recon = [], [[] for _ in range(task.tok.depth)]
  for local in preemption.checked(batches):
    batch = mesh_lib.global_batch(local, mesh)
    valid = mesh_lib.to_host(batch["valid"], mesh)
    images = mesh_lib.to_host(batch["image"], mesh)[valid]
    recons = image_utils.to_uint8(reconstruct(params, books, batch["image"]))  # [D, B, ...]
    real.append(extractor(images)[0])
    for j in range(task.tok.depth):
      recon[j].append(extractor(recons[j][valid])[0])
  reference = features_lib.Reference.from_features(np.concatenate(real))
  return [reference.frechet_distance(np.concatenate(r)) for r in recon]


def write_tokenizer_report(task: TokenizerTask, state, config, workdir: str,
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
  report.update(codebook_usage(task, state, full_eval(), mesh))
  if config.evaluation.tokenizer_rfid:
    if config.evaluation.extractor == "inception" and not config.evaluation.inception_weights:
      logging.warning("no reconstruction FID: evaluation.extractor='inception' needs "
                      "evaluation.inception_weights (or set evaluation.tokenizer_rfid=False)")
    else:
      count = config.evaluation.tokenizer_rfid_examples
      rfid_pass = eval_pass(config, config.data.eval_split, count) if count else full_eval
      report["rfid_by_depth"] = reconstruction_fid(
          task, state, feature_extractor(config, workdir), rfid_pass(), mesh)
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


def load_tokenizer(config, workdir: str, mesh):
  """``(task, state)`` of the trained tokenizer, for inference: needs only the workdir (no
  data, no LPIPS file, no optimizer or discriminator state read)."""
  spec = read_image_spec(config, workdir)
  size, channels = spec["image_size"], spec["image_channels"]
  task = make_tokenizer_task(config, channels)
  rows = mesh_lib.example_rows(mesh)
  example = mesh_lib.global_batch(
      {"image": np.zeros((rows, size, size, channels), np.uint8),
       "label": np.zeros((rows,), np.int32)}, mesh)
  state = trainer.load_trained_state(task, config.tokenizer.train, workdir, example, mesh,
                                     config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  return task, state


def run_encode(config, workdir: str, mesh) -> None:
  """Encodes the train and eval splits with the trained tokenizer into ``DIR/tokens``, a
  chunk of ``tokenizer.encode_chunk_batches`` batches at a time: a preempted or killed
  encoding resumes after its last complete chunk (``token_cache``)."""
  task, state = load_tokenizer(config, workdir, mesh)
  passes = {split: eval_pass(config, split)
            for split in (config.data.train_split, config.data.eval_split)}
  if int(state.step) < config.tokenizer.train.num_steps:
    raise ValueError(
        f"the tokenizer in {workdir} has trained {int(state.step)} of "
        f"{config.tokenizer.train.num_steps} steps; finish its training (--mode=train) "
        f"before encoding")
  h, w = task.tok.grid_shape(config.data.image_size)
  meta = {"grid": [h, w], "depth": task.tok.depth, "codebook_size": task.tok.codebook_size,
          "tokenizer_step": int(state.step), "image_size": config.data.image_size,
          "process_count": jax.process_count(),
          "data": {split: data_lib.fingerprint(config.data, split) for split in passes}}
  check_token_data(config, workdir, meta["data"])
  if token_cache.is_cached(workdir, tuple(passes), meta):
    logging.info("tokens already cached in %s", os.path.join(workdir, token_cache.TOKENS_DIR))
    return
  params, books = state.params["autoencoder"], state.model_state["codebook"].codebooks
  # Whole on every process (an FSDP-split codebook spans hosts), for tokens/codebooks.npz.
  host_books = mesh_lib.to_host(books, mesh)
  encode = jax.jit(task.tok.encode, out_shardings=mesh_lib.batch_sharding(mesh))

  def encode_local(batch):
    codes = encode(params, books, mesh_lib.global_batch({"image": batch["image"]}, mesh)["image"])
    shards = sorted((s for s in codes.addressable_shards if s.replica_id == 0),
                    key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])

  token_cache.begin_encoding(workdir, meta)
  for split, batches_from in passes.items():
    start = time.time()
    count = token_cache.encode_split(workdir, split, encode_local, batches_from,
                                     task.tok.codebook_size,
                                     config.tokenizer.encode_chunk_batches)
    seconds = time.time() - start
    logging.info("encoded %d %s examples on process %d in %.1f s (%.1f images/s)", count,
                 split, jax.process_index(), seconds, count / max(seconds, 1e-9))
  token_cache.write_meta(workdir, meta, host_books)


def check_token_data(config, workdir: str, current=None) -> None:
  """Refuses a token cache encoded from other data than ``config.data`` now names (data
  paths may change on resume, the data may not): the generator would train on the old
  codes and be scored against the new held-out images. ``current``: the fingerprints
  already computed. A cache from before fingerprints were recorded passes with a warning,
  and a workdir without one (samples evaluated on their own) has nothing to check."""
  if not os.path.exists(token_cache.meta_path(workdir)):
    return
  meta, _ = token_cache.load_meta(workdir)
  saved = meta.get("data")
  if saved is None:
    logging.warning("%s does not record which data it was encoded from; it is used as it is",
                    token_cache.meta_path(workdir))
    return
  current = current or {split: data_lib.fingerprint(config.data, split) for split in saved}
  changed = [split for split in saved if saved[split] != current.get(split)]
  if changed:
    raise ValueError(
        f"the token cache {os.path.dirname(token_cache.meta_path(workdir))} was encoded from "
        f"other data than data.path / data.eval_path now give (splits {changed}: "
        f"{[saved[s] for s in changed]} then, {[current.get(s) for s in changed]} now); "
        f"point the data fields back, or remove the tokens folder to encode the new data")


# generator.family -> its task; each trains with the shared trainer and samples through
# ``sample_tokens(params, model_state, codebooks, labels, rng, sampler_config)``.
FAMILIES = {"resgen": GeneratorTask, "direct": DirectTokenTask,
            "rq_transformer": RQTransformerTask}


def generator_depth(config, meta: dict) -> int:
  """How many depths of the cached codes the generator models: ``generator.token_depth``,
  or all of them (0). Raises a ValueError naming the field when out of range."""
  depth = config.generator.token_depth
  if not 0 <= depth <= meta["depth"]:
    raise ValueError(f"generator.token_depth must be in [0, {meta['depth']}] (0: every "
                     f"depth of the cached codes), got {depth}")
  return depth or meta["depth"]


def generator_codebooks(codebooks: np.ndarray, depth: int) -> np.ndarray:
  """The books of the first ``depth`` depths: per-depth books ``[D, V, d]`` are cut to
  ``[depth, V, d]``; a shared book ``[1, V, d]`` serves every depth as it is."""
  return codebooks if codebooks.shape[0] == 1 else codebooks[:depth]


def make_generator_task(config, workdir: str) -> TokenTask:
  family = config.generator.family
  if family not in FAMILIES:
    raise ValueError(f"generator.family must be one of {sorted(FAMILIES)}, got {family!r}")
  meta, codebooks = token_cache.load_meta(workdir)
  h, w = meta["grid"]
  depth = generator_depth(config, meta)
  return FAMILIES[family](config.generator, generator_codebooks(codebooks, depth), h * w,
                          depth, config.data.num_classes)


def run_generator(config, workdir: str, mesh) -> None:
  """Trains the ResGen generator on the cached tokens."""
  gcfg = config.generator.train
  mesh_lib.check_batch_size(gcfg.batch_size, mesh, gcfg.grad_accum_steps)
  mesh_lib.check_batch_size(gcfg.eval_batch_size, mesh)
  task = make_generator_task(config, workdir)
  check_token_data(config, workdir)
  pid, count = jax.process_index(), jax.process_count()
  classes = config.data.num_classes
  train_iter = token_cache.TokenBatches(
      token_cache.token_source(workdir, config.data.train_split, classes, task.depth),
      gcfg.batch_size, config.seed, pid, count)
  eval_source = token_cache.token_source(workdir, config.data.eval_split, classes,
                                         task.depth)
  every = config.evaluation.proxy_every  # >= 0, checked at start-up (config_checks)
  hooks = ((every, make_fid_proxy(config, workdir, mesh, task)),) if every else ()
  result = trainer.train_and_evaluate(
      task, gcfg, workdir, train_iter,
      lambda: token_cache.sequential_token_batches(eval_source, gcfg.eval_batch_size, pid,
                                                   count, gcfg.eval_examples or None),
      mesh, config.seed, mesh_lib.ShardingRules.from_config(config.mesh), hooks=hooks)
  if result.preempted:
    raise SystemExit(preemption.EXIT_CODE)


def load_generator(config, workdir: str, mesh):
  """``(task, state)`` of the trained generator."""
  task = make_generator_task(config, workdir)
  meta, _ = token_cache.load_meta(workdir)
  rows = mesh_lib.example_rows(mesh)
  example = mesh_lib.global_batch(
      {"codes": np.zeros((rows, *meta["grid"], task.depth), np.int32),
       "label": np.zeros((rows,), np.int32)}, mesh)
  state = trainer.load_trained_state(task, config.generator.train, workdir, example, mesh,
                                     config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  return task, state


def settings_hash(cfg: ml_collections.ConfigDict, exclude=()) -> str:
  """A short stable hash of a config section's values."""
  values = {k: v for k, v in cfg.to_dict().items() if k not in exclude}
  return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:SETTINGS_HASH_CHARS]


def sample_tag(scfg, generator_step: Optional[int] = None) -> str:
  """The sample set's name: ``sampler.tag``, or its main settings plus a hash of all of
  them and the generator step it is drawn from (``_g<step>``), so another sampler setting
  or a generator trained further makes a new set instead of reusing an old one."""
  if scfg.tag:
    return scfg.tag
  step = "" if generator_step is None else f"_g{generator_step}"
  return (f"T{scfg.steps}_cfg{scfg.cfg_scale:g}_temp{scfg.temperature:g}_"
          f"topp{scfg.top_p:g}_conf{scfg.confidence_temperature:g}_seed{scfg.seed}_"
          f"{settings_hash(scfg, exclude=('tag',))}{step}")


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


def decode_prefix(tok_task: TokenizerTask, ae_params, codebooks, codes: jax.Array) -> jax.Array:
  """Images ``[B,H,W,C]`` (floats in [-1, 1]) of codes ``[B,h,w,D']`` of the first
  ``D' <= D`` depths (a generator of a depth prefix, ``generator.token_depth``)."""
  depth = codes.shape[-1]
  padded = jnp.pad(codes, ((0, 0),) * 3 + ((0, tok_task.tok.depth - depth),))
  return tok_task.tok.decode(ae_params, codebooks, padded, prefix=depth)


def make_image_sampler(config, tok_task: TokenizerTask, gen_task: TokenTask,
                       mesh) -> Callable:
  """A jitted ``(gen_params, gen_state, ae_params, codebooks, labels [B], rng) ->
  (images float [B,H,W,C], codes [B,h,w,D], reveal_step [B,h,w,D])`` for any generator
  family (``reveal_step``: the network call that drew each token)."""
  h, w = tok_task.tok.grid_shape(config.data.image_size)

  def draw(gen_params, gen_state, ae_params, codebooks, labels, rng):  # labels batch-sharded
    out = gen_task.sample_tokens(gen_params, gen_state,
                                 generator_codebooks(codebooks, gen_task.depth), labels, rng,
                                 config.sampler)
    grid = lambda x: x.reshape(labels.shape[0], h, w, gen_task.depth)
    codes = grid(out.codes)
    return decode_prefix(tok_task, ae_params, codebooks, codes), codes, grid(out.reveal_step)

  # Outputs replicated, so every process can read the whole batch.
  return jax.jit(draw, out_shardings=mesh_lib.replicated(mesh))


def compiled_image_sampler(config, tok_task: TokenizerTask, tok_state, gen_task: TokenTask,
                           gen_state, mesh) -> Callable:
  """``(gen_state, labels int [n], index) -> (images uint8 [n,H,W,C], codes [n,h,w,D],
  reveal_step [n,h,w,D])`` for ``n <= sampler.batch_size``, compiled here for that one batch shape (shorter batches
  are padded), so calls time sampling alone. Batch ``index`` draws from
  ``fold_in(key(sampler.seed), index)``; ``gen_state`` may change between calls (the
  training-time proxy) as long as its layout does not."""
  scfg = config.sampler
  mesh_lib.check_batch_size(scfg.batch_size, mesh)
  draw = make_image_sampler(config, tok_task, gen_task, mesh)
  ae_params = tok_state.params["autoencoder"]
  codebooks = tok_state.model_state["codebook"].codebooks
  args = lambda state, padded, index: (
      state.eval_params(), state.model_state, ae_params, codebooks,
      mesh_lib.replicated_host_batch(padded.astype(np.int32), mesh),
      jax.random.fold_in(jax.random.key(scfg.seed), index))
  compiled = draw.lower(*args(gen_state, np.zeros(scfg.batch_size, np.int32), 0)).compile()

  def sample(state, labels: np.ndarray, index: int):
    if not 0 < len(labels) <= scfg.batch_size:
      raise ValueError(f"{len(labels)} labels for a sampler of batch size {scfg.batch_size}")
    padded = np.pad(labels, (0, scfg.batch_size - len(labels)))  # one compiled shape
    images, codes, steps = compiled(*args(state, padded, index))
    return (image_utils.to_uint8(images)[:len(labels)], np.asarray(codes)[:len(labels)],
            np.asarray(steps)[:len(labels)])

  return sample


def label_batches(labels: np.ndarray, batch_size: int):
  """``(index, labels[first:first + batch_size])`` for the batches of ``labels``."""
  return enumerate(labels[first:first + batch_size]
                   for first in range(0, len(labels), batch_size))


def run_sample(config, workdir: str, mesh) -> str:
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
  tok_task, tok_state = load_tokenizer(config, workdir, mesh)
  gen_task, gen_state = load_generator(config, workdir, mesh)
  sample = compiled_image_sampler(config, tok_task, tok_state, gen_task, gen_state, mesh)
  labels = np.repeat(np.arange(config.data.num_classes), scfg.samples_per_class)
  size, (h, w) = config.data.image_size, tok_task.tok.grid_shape(config.data.image_size)
  channels = tok_task.tok.autoencoder.image_channels
  writer = process_zero_npz(path, arr_0=((len(labels), size, size, channels), np.uint8),
                            labels=((len(labels),), np.int32),
                            codes=((len(labels), h, w, gen_task.depth), np.int32))
  seconds = 0.0
  with writer as out:
    for index, chunk in preemption.checked(label_batches(labels, scfg.batch_size)):
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


def run_evaluate(config, workdir: str, mesh) -> dict:
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
  samples = samples_path(config, workdir)
  out = os.path.splitext(samples)[0] + "_eval.json"
  if not os.path.exists(samples):
    raise FileNotFoundError(f"no samples at {samples}; run the 'sample' stage first")
  steps = check_sample_provenance(samples, workdir)
  check_token_data(config, workdir)
  settings = evaluation_settings(config.evaluation)
  if os.path.exists(out):
    with open(out) as f:
      report = json.load(f)
    if saved_settings(report, settings) != settings:
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


def _evaluate_with_classifier(config, workdir: str, samples: str) -> dict:
  """Class agreement, Frechet distance and precision/recall in the features of a classifier:
  the project's (``classifier``) or a pretrained one (``resnet``)."""
  classes = config.data.num_classes
  real_images, real_labels = data_lib.load_all(config.data, config.data.eval_split)
  train_images, _ = data_lib.load_all(config.data, config.data.train_split)
  evaluator = classifier.ClassifierEvaluator(
      None, classes, real_images, real_labels, baseline_images=train_images,
      extractor=feature_extractor(config, workdir))
  with np.load(samples, allow_pickle=False) as data:
    labels = data["labels"]
  generated = evaluator.evaluate_batches(preemption.checked(
      fid.npz_member_batches(samples, "arr_0", config.evaluation.batch_size), agree=False),
                                         labels)
  return {"num_samples": int(labels.shape[0]), "generated": generated,
          "real_heldout": evaluator.reference()}


def _evaluate_with_inception(config, workdir: str, samples: str) -> dict:
  ecfg = config.evaluation
  extract = feature_extractor(config, workdir)
  features, logits = features_lib.extract(extract, preemption.checked(
      fid.npz_member_batches(samples, "arr_0", ecfg.batch_size), agree=False))
  report = {"num_samples": int(features.shape[0])}
  if ecfg.reference_stats:
    reference = fid.load_reference(ecfg.reference_stats)
  else:
    real_features, real_logits = heldout_features(config, extract)
    reference = features_lib.Reference.from_features(real_features)
    splits = min(metrics_lib.IS_SPLITS, real_features.shape[0])
    report["real_heldout"] = dict(zip(("inception_score", "inception_score_std"),
                                      metrics_lib.inception_score(real_logits, splits)))
  report["generated"] = fid.score(features, logits, reference)
  return report


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


def make_fid_proxy(config, workdir: str, mesh, gen_task: TokenTask) -> Callable:
  """``state -> {"fid_proxy": d}``: the Frechet distance between ``evaluation.proxy_samples``
  images sampled from the generator ``state`` (``config.sampler`` settings, classes in
  turn, the same seed every call) and the real held-out images, in the features of
  ``evaluation.extractor``. Samples go from the sampler to the extractor batch by batch.
  Compiles on its first call."""
  count = config.evaluation.proxy_samples
  config_checks.check_proxy_samples(count)
  tok_task, tok_state = load_tokenizer(config, workdir, mesh)
  extractor = feature_extractor(config, workdir)
  reference = proxy_reference(config, extractor)
  # Classes in turn, sorted: with count = C x samples_per_class these are the sample stage's
  # labels, and the proxy at the last step is that stage's Frechet distance.
  labels = np.sort(np.arange(count) % config.data.num_classes)
  compiled = []

  def proxy(state) -> dict:
    if not compiled:
      compiled.append(compiled_image_sampler(config, tok_task, tok_state, gen_task, state,
                                             mesh))
    features, _ = features_lib.extract(
        extractor, (compiled[0](state, chunk, index)[0] for index, chunk in
                    preemption.checked(label_batches(labels, config.sampler.batch_size))))
    return {"fid_proxy": reference.frechet_distance(features)}

  return proxy


STAGES: Dict[str, Callable] = {"tokenizer": run_tokenizer, "encode": run_encode,
                               "generator": run_generator, "sample": run_sample,
                               "evaluate": run_evaluate}


def run(config: ml_collections.ConfigDict, workdir: str, stages=None) -> None:
  """Runs ``stages`` (default ``config.stages``) in order in ``workdir``."""
  stages = tuple(config.stages if stages is None else stages)
  table = STAGES
  if config.data.name in corpus.SPEECH_SOURCES:
    from resgen_jax.audio import stages as speech_stages  # pylint: disable=g-import-not-at-top
    table = speech_stages.STAGES
  unknown = [s for s in stages if s not in table]
  if unknown:
    kind = "speech" if table is not STAGES else "image"
    raise ValueError(f"unknown stages {unknown} for a {kind} config (data.name="
                     f"{config.data.name!r}); known: {sorted(table)}")
  config_checks.check_config(config, stages)  # before anything is written or trained
  if "evaluate" in stages and table is STAGES:
    check_evaluation_data(config)
  if "generator" in stages and config.generator.family not in FAMILIES:
    raise ValueError(f"generator.family must be one of {sorted(FAMILIES)}, got "
                     f"{config.generator.family!r}")
  os.makedirs(workdir, exist_ok=True)
  steps_before = checkpoint_steps(workdir)
  previous = write_run_config(config, workdir)
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
    if checkpoint_steps(workdir) == steps_before:
      restore_run_config(workdir, previous)
    raise
