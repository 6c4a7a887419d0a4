"""The ``generator`` stage: trains the family ``generator.family`` names on the cached
tokens (``DIR/generator/``), logging ``train/fid_proxy`` every ``evaluation.proxy_every``
steps. :func:`load` gives the trained generator to sampling and the API."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from resgen_jax import config_checks
from resgen_jax.baselines.direct import DirectTokenTask
from resgen_jax.baselines.rq_transformer import RQTransformerTask
from resgen_jax.codec import rvq, token_cache
from resgen_jax.evaluation import features as features_lib
from resgen_jax.generator.task import GeneratorTask, TokenTask
from resgen_jax.stages import encode, extractors, sampling, tokenizer
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption, trainer

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


def make_task(config, workdir: str) -> TokenTask:
  """The task of ``generator.family`` for the workdir's token cache (grid, depth prefix,
  codebooks)."""
  family = config.generator.family
  if family not in FAMILIES:
    raise ValueError(f"generator.family must be one of {sorted(FAMILIES)}, got {family!r}")
  meta, codebooks = token_cache.load_meta(workdir)
  h, w = meta["grid"]
  depth = generator_depth(config, meta)
  return FAMILIES[family](config.generator, rvq.prefix_codebooks(codebooks, depth), h * w,
                          depth, config.data.num_classes)


def run(config, workdir: str, mesh) -> None:
  """Trains ``generator.family`` on the cached tokens (resumes from its last checkpoint)."""
  gcfg = config.generator.train
  mesh_lib.check_batch_size(gcfg.batch_size, mesh, gcfg.grad_accum_steps)
  mesh_lib.check_batch_size(gcfg.eval_batch_size, mesh)
  task = make_task(config, workdir)
  encode.check_token_data(config, workdir)
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


def load(config, workdir: str, mesh):
  """``(task, state)`` of the trained generator."""
  task = make_task(config, workdir)
  meta, _ = token_cache.load_meta(workdir)
  rows = mesh_lib.example_rows(mesh)
  example = mesh_lib.global_batch(
      {"codes": np.zeros((rows, *meta["grid"], task.depth), np.int32),
       "label": np.zeros((rows,), np.int32)}, mesh)
  state = trainer.load_trained_state(task, config.generator.train, workdir, example, mesh,
                                     config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  return task, state


def make_fid_proxy(config, workdir: str, mesh, gen_task: TokenTask) -> Callable:
  """``state -> {"fid_proxy": d}``: the Frechet distance between ``evaluation.proxy_samples``
  images sampled from the generator ``state`` (``config.sampler`` settings, classes in
  turn, the same seed every call) and the real held-out images, in the features of
  ``evaluation.extractor``. Samples go from the sampler to the extractor batch by batch.
  Compiles on its first call."""
  count = config.evaluation.proxy_samples
  config_checks.check_proxy_samples(count)
  tok_task, tok_state = tokenizer.load(config, workdir, mesh)
  extractor = extractors.feature_extractor(config, workdir)
  reference = extractors.proxy_reference(config, extractor)
  # Classes in turn, sorted: with count = C x samples_per_class these are the sample stage's
  # labels, and the proxy at the last step is that stage's Frechet distance.
  labels = np.sort(np.arange(count) % config.data.num_classes)
  compiled = []

  def proxy(state) -> dict:
    if not compiled:
      compiled.append(sampling.compiled_image_sampler(config, tok_task, tok_state, gen_task, state,
                                             mesh))
    features, _ = features_lib.extract(
        extractor, (compiled[0](state, chunk, index)[0] for index, chunk in
                    preemption.checked(sampling.label_batches(labels, config.sampler.batch_size))))
    return {"fid_proxy": reference.frechet_distance(features)}

  return proxy
