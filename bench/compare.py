"""ResGen against the baselines on the same RVQ tokens, as the depth grows (issue: the
paper's comparison at small scale).

    python -m bench.compare [--batch 64] [--repeats 9] [--memory_budget_gb 1]
                            [--grid_side 4] [--num_layers 4] [--width 128]
                            [--workdir DIR --train_steps 1500] [--out bench/results]

Speed and memory (random weights; the digits token grid, 4x4, codebooks of 64 codes, at
depths 4, 8 and 16): for each family (``resgen``, ``direct``, ``rq_transformer``) at a
parameter count matched to ResGen's (the number of layers closest to it), the wall-clock of
the jitted sampler per image (median, compile excluded), XLA's peak memory of that
computation per image (the parameters excluded), and the largest batch whose peak fits in
``--memory_budget_gb`` (the paper's "max batch"; XLA's estimate, found by compiling).
``--num_layers`` and ``--width`` size ResGen (default: the digits generator, 4 x 128); the
baselines are matched to it. The memory comparison depends on the depth of the networks:
ResGen's peak is one block's activations over all L positions, the RQ-Transformer's is a
key/value cache that grows with its number of spatial layers.

Quality (with ``--workdir``): the digits pipeline with a tokenizer of each depth, then each
family trained for ``--train_steps`` generator steps on those tokens (same batch, schedule
and seed), sampled with the config's sampler (ResGen and direct: T = 8 steps; the
RQ-Transformer: one token at a time, L x D draws) and scored with the project's classifier
(Frechet distance to the held-out split; lower is better).

Writes ``<out>/compare_<platform>.{json,md,png}``: the table and the quality-against-time
plot. Runs unchanged on CPU, GPU or TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds
from resgen_jax import config_base, stages, sweep
from resgen_jax.codec import rvq, token_cache
from resgen_jax.utils import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHS = (4, 8, 16)
FAMILIES = ("resgen", "direct", "rq_transformer")
GRID_SIDE = 4  # the digits token grid (16x16 images, 4x downsampling)
CODEBOOK_SIZE, LATENT_DIM = 64, 16  # configs/digits.py
MAX_LAYERS = 48  # layer counts tried when matching parameter counts
SHARED_STAGES_DIRS = ("tokenizer", token_cache.TOKENS_DIR, stages.extractors.EVALUATION_DIR)


def digits_config(num_layers: int = 0, width: int = 0):
  """configs/digits.py, with ResGen's ``num_layers`` and ``width`` if given (> 0)."""
  config = config_base.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  if num_layers:
    config.generator.model.num_layers = num_layers
  if width:
    config.generator.model.width = width
  return config


def family_config(config, family: str, num_layers: int):
  """``config`` with ``family`` of ``num_layers`` layers (the RQ-Transformer: spatial
  layers; its ``generator.rq.depth_layers`` come on top)."""
  config = config.copy_and_resolve_references()
  config.generator.family = family
  config.generator.model.num_layers = num_layers
  return config


def make_task(config, depth: int, side: int = GRID_SIDE, books=None):
  """The family of ``config`` on a ``side x side`` grid of depth ``depth``, with the
  codebooks ``books`` ``[C, V, d]`` (default: random digits-sized books)."""
  if books is None:
    books = np.random.default_rng(depth).normal(size=(depth, CODEBOOK_SIZE, LATENT_DIM))
  books = rvq.prefix_codebooks(np.asarray(books, np.float32), depth)
  family = stages.generator.FAMILIES[config.generator.family]
  return family(config.generator, books, side * side, depth, config.data.num_classes)


def init(task, batch: int = 1):
  example = {"codes": jnp.zeros((batch, task.num_positions, task.depth), jnp.int32),
             "label": jnp.zeros((batch,), jnp.int32)}
  return task.init(jax.random.key(0), example)


def parameter_count(task) -> int:
  params, _ = jax.eval_shape(lambda: init(task))
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def matched_config(config, family: str, depth: int, target: int, side: int = GRID_SIDE,
                   books=None):
  """The family's config whose parameter count is closest to ``target`` (by layers; the
  count grows with them, so the search stops at the first count past the target), and
  that count."""
  best = None
  for num_layers in range(1, MAX_LAYERS + 1):
    candidate = family_config(config, family, num_layers)
    count = parameter_count(make_task(candidate, depth, side, books))
    if best is None or abs(count - target) < abs(best[1] - target):
      best = candidate, count
    if count >= target:
      break
  return best


def compiled_sampler(task, params, state, batch: int, scfg):
  labels = jnp.arange(batch, dtype=jnp.int32) % task.num_classes
  fn = jax.jit(lambda p, s, r: task.sample_codes(p, s, task.codebooks, labels, r, scfg))
  return fn.lower(params, state, jax.random.key(1)).compile()


def peak_bytes(compiled) -> int:
  """XLA's buffer assignment of the computation: arguments + outputs + temporaries (what
  ``peak_memory_in_bytes`` means on GPU/TPU; the CPU backend reports less there)."""
  stats = compiled.memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def max_batch(task, params, state, scfg, budget: int, fixed: int, per_image: float) -> int:
  """The largest batch whose compiled peak fits ``budget``: start from the linear estimate
  ``fixed + per_image * B`` and, while a compile says it does not fit, rescale the batch by
  the per-image bytes that compile measured (backends may spend more per image at large
  batches than at small ones)."""
  batch = max(1, int((budget - fixed) / max(per_image, 1.0)))
  while batch > 1:
    peak = peak_bytes(compiled_sampler(task, params, state, batch, scfg))
    if peak <= budget:
      break
    batch = max(1, min(batch - 1, int(batch * (budget - fixed) / (peak - fixed))))
  return batch


def speed_and_memory(config, family: str, depth: int, target_params: int, batch: int,
                     repeats: int, budget: int, side: int) -> dict:
  config, count = matched_config(config, family, depth, target_params, side)
  task = make_task(config, depth, side)
  params, state = init(task)
  scfg = config.sampler
  compiled = compiled_sampler(task, params, state, batch, scfg)
  seconds = median_seconds(lambda: compiled(params, state, jax.random.key(1)), repeats)
  peak = peak_bytes(compiled)
  small = peak_bytes(compiled_sampler(task, params, state, batch // 2, scfg))
  per_image = (peak - small) / (batch - batch // 2)
  fixed = peak - per_image * batch
  return {"family": family, "depth": depth, "params": count,
          "num_layers": config.generator.model.num_layers,
          "seconds_per_image": seconds / batch, "peak_bytes_per_image": per_image,
          "max_batch": max_batch(task, params, state, scfg, budget, fixed, per_image)}


def quality(config, family: str, depth: int, num_layers: int, workdir: str,
            train_steps: int) -> dict:
  """Trains ``family`` on the tokens of a depth-``depth`` digits tokenizer; -> the sample
  set's scores and sampling time."""
  config = family_config(config, family, num_layers)
  config.tokenizer.quantizer.depth = depth
  config.generator.train.num_steps = train_steps
  config.evaluation.proxy_every = 0
  shared = os.path.join(workdir, f"d{depth}", "resgen")
  run_dir = os.path.join(workdir, f"d{depth}", family)
  if family != "resgen":  # the same tokenizer, tokens and classifier as ResGen's run
    for name in SHARED_STAGES_DIRS:
      if not os.path.exists(os.path.join(run_dir, name)):
        shutil.copytree(os.path.join(shared, name), os.path.join(run_dir, name))
  stages.run(config, run_dir)
  samples = stages.sample.samples_path(config, run_dir)
  with open(os.path.splitext(samples)[0] + "_eval.json") as f:
    report = json.load(f)["generated"]
  with np.load(samples) as data:
    seconds = float(data["seconds_per_image"])
  return {"frechet_distance": report["frechet_distance"],
          "class_agreement": report["class_agreement"],
          "trained_seconds_per_image": seconds}


def markdown(rows) -> str:
  head = ["family", "D", "params", "layers", "ms / image", "peak KiB / image", "max batch"]
  with_quality = "frechet_distance" in rows[0]
  if with_quality:
    head += ["Frechet (classifier)", "class agreement", "ms / image (trained, digits)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["family"], str(r["depth"]), f"{r['params'] / 1e6:.2f}M", str(r["num_layers"]),
             f"{1e3 * r['seconds_per_image']:.2f}", f"{r['peak_bytes_per_image'] / 1024:.0f}",
             str(r["max_batch"])]
    if with_quality:
      cells += [f"{r['frechet_distance']:.2f}", f"{r['class_agreement']:.3f}",
                f"{1e3 * r['trained_seconds_per_image']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def targets(rows) -> dict:
  """The issue's targets, from the rows."""
  at = {(r["family"], r["depth"]): r for r in rows}
  speedup = {d: at["rq_transformer", d]["seconds_per_image"] / at["resgen", d]["seconds_per_image"]
             for d in DEPTHS}
  return {
      "rq_over_resgen_time": speedup,
      "resgen_d16_over_d4_time": (at["resgen", 16]["seconds_per_image"]
                                  / at["resgen", 4]["seconds_per_image"]),
      "resgen_memory_at_or_below_baselines": all(
          at["resgen", d]["peak_bytes_per_image"] <= min(
              at[f, d]["peak_bytes_per_image"] for f in FAMILIES[1:]) for d in DEPTHS),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--grid_side", type=int, default=GRID_SIDE,
                      help="token grid side of the speed and memory part")
  parser.add_argument("--num_layers", type=int, default=0,
                      help="ResGen's layers (0: the digits generator's)")
  parser.add_argument("--width", type=int, default=0,
                      help="the transformers' width (0: the digits generator's)")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--memory_budget_gb", type=float, default=1.0)
  parser.add_argument("--workdir", default="", help="run the quality comparison here")
  parser.add_argument("--train_steps", type=int, default=1500)
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  args = parser.parse_args()
  if args.batch < 2:  # memory per image is the slope between batch // 2 and batch
    parser.error("--batch must be at least 2")
  if args.grid_side < 1 or args.repeats < 1:
    parser.error("--grid_side and --repeats must be at least 1")
  if args.num_layers < 0 or args.width < 0:
    parser.error("--num_layers and --width must be positive (0: the digits generator's)")
  if args.workdir and args.grid_side != GRID_SIDE:
    raise ValueError(f"the quality part trains on the digits grid; use --grid_side "
                     f"{GRID_SIDE} with --workdir")
  config = digits_config(args.num_layers, args.width)
  shape = config.generator.model
  budget = int(args.memory_budget_gb * 2 ** 30)
  rows = []
  for depth in DEPTHS:  # every timing first, in a process that has not trained yet
    target = parameter_count(make_task(config, depth, args.grid_side))
    for family in FAMILIES:
      rows.append(speed_and_memory(config, family, depth, target, args.batch, args.repeats,
                                   budget, args.grid_side))
      print(json.dumps(rows[-1]), flush=True)
  if args.workdir:
    for row in rows:
      row.update(quality(config, row["family"], row["depth"], row["num_layers"],
                         args.workdir, args.train_steps))
      print(json.dumps(row), flush=True)
  platform = jax.devices()[0].platform
  summary = targets(rows)
  table = markdown(rows)
  print(table)
  print(json.dumps(summary, indent=2))
  suffix = "".join(f"_{name}{value}" for name, value, default in (
      ("grid", args.grid_side, GRID_SIDE), ("layers", args.num_layers, 0),
      ("width", args.width, 0)) if value != default)
  path = os.path.join(args.out, f"compare_{platform}{suffix}")
  files.save_json(path + ".json", {
      "platform": platform, "devices": jax.device_count(), "batch": args.batch,
      "grid_side": args.grid_side, "num_layers": shape.num_layers, "width": shape.width,
      "repeats": args.repeats, "memory_budget_bytes": budget, "train_steps": args.train_steps,
      "rows": rows, "targets": summary})
  with files.atomic_write(path + ".md") as tmp, open(tmp, "w") as f:
    f.write(table)
  if args.workdir:
    sweep.plot([dict(r, seconds_per_image=r["trained_seconds_per_image"]) for r in rows],
               "frechet_distance", label=lambda r: f"{r['family']} D{r['depth']}").save(
                   path + ".png")
  print(f"wrote {path}.json / .md" + (" / .png" if args.workdir else ""))


if __name__ == "__main__":
  main()
