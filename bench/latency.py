"""Sampling latency and memory of ResGen against the baselines, in the regime of the claim.

    python -m bench.latency [--preset full|cpu] [--sizes digits,100m] [--sides 4,8]
        [--depths 4,8,16] [--batches 1,4,16,64] [--steps 8,16] [--cfg 1,3]
        [--families resgen,direct,rq_transformer] [--repeats 3] [--memory_budget_gb 16]
        [--out bench/results] [--tag NAME] [--head_memory] [--agreement WORKDIR]

The paper's speed claim (ResGen: T network calls whatever the depth; an autoregressive RVQ
model: L x D sequential steps) is about small batches of large models, where every
sequential step streams the weights from memory again. Each point is a family at a
parameter count matched to ResGen's (``bench.compare.matched_config``, random weights),
a model size (``SIZES``), a token grid ``side x side`` of depth D, a batch, T and a CFG
scale; it records the jitted sampler's median wall-clock per image (compile excluded),
XLA's peak bytes of the computation per image beyond the weights (at the largest batch also
the largest batch whose peak fits ``--memory_budget_gb``, the paper's "max batch"), the
number of sequential network calls, and two lower bounds on the time from the device's measured peaks (a large matmul's FLOP/s and a
large reduction's bytes/s, :func:`device_peaks`):

* compute: the matmul FLOPs, ``2 x parameters x tokens`` summed over the calls;
* memory: the weight bytes every sequential call streams (ResGen, direct: all weights per
  call; RQ-Transformer: the spatial blocks per position, the depth blocks and head per
  token).

The larger bound names the regime (``memory`` or ``compute``); activations, attention and
key/value caches are left out of both, so they are estimates, stated as such. A rerun skips
the points already in ``<out>/latency_<platform>[_<tag>].json`` (the file is rewritten after
each point), and writes the table (``.md``) and a plot (``.png``: time per image against
depth, one line per family, one panel per batch, at the first size, the largest side, the
first T and CFG scale). Runs unchanged on CPU, GPU or TPU; ``--preset cpu`` is a grid a
2-core machine finishes in about 10 minutes (the issue's headline point: ~100M
parameters, 8x8, depths 4 and 16, batch <= 4). ``--head_memory`` adds ResGen's sampler
peak with every component's mean ``[B, L, K, d]`` made against the drawn component's only
(:func:`head_memory`); ``--agreement WORKDIR`` samples a trained run in bfloat16 and in
float32 from one seed and reports how many tokens agree (:func:`dtype_agreement`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bench import compare, study
from bench.timing import median_seconds
from resgen_jax.generator import sampler
from resgen_jax.utils import files

# Model sizes: ResGen's (width, layers, heads); baselines are matched by their layers.
SIZES = {"digits": (128, 4, 4), "100m": (768, 12, 12)}
PRESETS = {
    "full": dict(sizes="digits,100m", sides="4,8", depths="4,8,16", batches="1,4,16,64",
                 steps="8,16", cfg="1,3"),
    "cpu": dict(sizes="100m", sides="8", depths="4,16", batches="1,4", steps="8", cfg="1"),
}
PEAK_MATMUL = 4096  # side of the square float32 matmul that measures peak FLOP/s
PEAK_BYTES = 1 << 28  # float32 bytes reduced to measure the memory bandwidth (256 MiB)


def device_peaks(repeats: int = 5) -> Dict[str, float]:
  """Measured FLOP/s of a large float32 matmul and bytes/s of a large reduction."""
  a = jnp.ones((PEAK_MATMUL, PEAK_MATMUL), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  flops = 2 * PEAK_MATMUL ** 3 / median_seconds(lambda: matmul(a), repeats)
  big = jnp.ones((PEAK_BYTES // 4,), jnp.float32)
  reduce = jax.jit(jnp.sum)
  bandwidth = PEAK_BYTES / median_seconds(lambda: reduce(big), repeats)
  return {"flops_per_s": flops, "bytes_per_s": bandwidth}


def size_config(size: str):
  """configs/digits.py with ResGen at the model size ``size``."""
  width, layers, heads = SIZES[size]
  config = compare.digits_config(layers, width)
  config.generator.model.num_heads = heads
  return config


def param_bytes(tree) -> int:
  return int(sum(np.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(tree)))


def param_count(tree) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(tree)))


def work(family: str, params, side: int, depth: int, batch: int, steps: int,
         cfg_scale: float) -> dict:
  """Sequential network calls, matmul FLOPs and streamed weight bytes of one sampler run
  (see the module doc)."""
  model = params["model"]
  length, streams = side * side, 2 if cfg_scale != 1.0 else 1
  if family == "rq_transformer":
    spatial = {k: v for k, v in model.items() if k.startswith("spatial_blocks")}
    per_token = {k: v for k, v in model.items() if k not in spatial}
    calls = length * (1 + depth)
    flops = 2 * batch * streams * length * (param_count(spatial) + depth * param_count(
        per_token))
    streamed = length * (param_bytes(spatial) + depth * param_bytes(per_token))
  else:  # T steps, a second call per step with CFG
    calls = steps * streams
    flops = 2 * batch * length * calls * param_count(model)
    streamed = calls * param_bytes(model)
  return {"sequential_calls": calls, "flops": float(flops), "streamed_bytes": float(streamed)}


def measure(config, family: str, size: str, side: int, depth: int, batch: int, steps: int,
            cfg_scale: float, target: int, repeats: int, peaks: dict, budget: int = 0) -> dict:
  """One point of the grid (see the module doc); with ``budget`` (bytes) also the largest
  batch whose peak fits it."""
  config, count = compare.matched_config(config, family, depth, target, side)
  config.sampler.update(steps=steps, cfg_scale=cfg_scale)
  task = compare.make_task(config, depth, side)
  params, state = compare.init(task)
  compiled = compare.compiled_sampler(task, params, state, batch, config.sampler)
  seconds = median_seconds(lambda: compiled(params, state, jax.random.key(1)), repeats)
  fixed = param_bytes(params)
  per_image = (compare.peak_bytes(compiled) - fixed) / batch
  row = {"family": family, "size": size, "side": side, "depth": depth, "batch": batch,
         "steps": steps, "cfg_scale": cfg_scale, "params": count,
         "num_layers": config.generator.model.num_layers, "seconds": seconds,
         "seconds_per_image": seconds / batch,
         "peak_bytes_per_image": per_image}
  if budget:  # the paper's "max batch": the largest batch whose compiled peak fits
    row["max_batch"] = compare.max_batch(task, params, state, config.sampler, budget, fixed,
                                         per_image)
  row.update(work(family, params, side, depth, batch, steps, cfg_scale))
  compute_s = row["flops"] / peaks["flops_per_s"]
  memory_s = row["streamed_bytes"] / peaks["bytes_per_s"]
  row.update(compute_bound_s=compute_s, memory_bound_s=memory_s,
             regime="memory" if memory_s > compute_s else "compute",
             achieved_flops_per_s=row["flops"] / seconds,
             achieved_bytes_per_s=row["streamed_bytes"] / seconds)
  return row


HEAD_SHAPES = ((16, 16, 16), (256, 64, 16), (256, 64, 64))  # (d, r, K): digits, ImageNet, K=64


def head_memory(batch: int = 64, side: int = 8, depth: int = 16) -> List[dict]:
  """Peak bytes per image (weights excluded) of ResGen's sampler with every component's
  mean made ``[B, L, K, d]`` (``network_fn`` without ``low_rank``) against the low-rank
  rows with only the drawn component projected (what ``infill`` runs), per head shape."""
  rows = []
  config = size_config("digits")
  for dim, rank, components in HEAD_SHAPES:
    config.generator.model.update(num_components=components, low_rank=rank)
    books = np.random.default_rng(0).normal(size=(depth, compare.CODEBOOK_SIZE, dim))
    task = compare.make_task(config, depth, side, books)
    params, state = compare.init(task)
    labels = jnp.arange(batch, dtype=jnp.int32) % task.num_classes
    valid = jnp.ones((batch, side * side), bool)
    start = jnp.zeros((batch, side * side, depth), jnp.int32)
    known, scfg = jnp.zeros(start.shape, bool), config.sampler

    def full(p, s, rng):
      network = task.network_fn(p, s, task.codebooks, labels, valid)
      return sampler.unmask(sampler.mixture_proposal(network, task.codebooks, scfg), start,
                            known, rng, scfg).codes

    def low_rank(p, s, rng):
      return task.infill(p, s, task.codebooks, start, known, valid, labels, rng, scfg).codes

    peaks = [(compare.peak_bytes(jax.jit(f).lower(params, state, jax.random.key(0)).compile())
              - param_bytes(params)) / batch for f in (full, low_rank)]
    rows.append({"latent_dim": dim, "low_rank": rank, "num_components": components,
                 "batch": batch, "side": side, "depth": depth,
                 "all_means_bytes_per_image": peaks[0], "drawn_mean_bytes_per_image": peaks[1]})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def dtype_agreement(workdir: str, count: int, repeats: int) -> dict:
  """A trained run sampled in float32 and in bfloat16 (``sampler.dtype``) from the same
  seed: the fraction of equal tokens (all, and by depth) and the time per image of each."""
  from resgen_jax import api  # pylint: disable=import-outside-toplevel (loads a workdir)
  run = api.load(workdir)
  out, codes = {"workdir": workdir, "count": count}, {}
  for dtype in ("float32", "bfloat16"):
    draw = lambda: run.sample(count=count, seed=0, dtype=dtype)
    out[f"{dtype}_seconds_per_image"] = median_seconds(lambda: draw().codes, repeats) / count
    codes[dtype] = draw().codes
  same = codes["float32"] == codes["bfloat16"]  # [N, h, w, D]
  out.update(equal_tokens=float(same.mean()),
             equal_tokens_by_depth=[float(v) for v in same.mean(axis=(0, 1, 2))],
             equal_images=float(same.all(axis=(1, 2, 3)).mean()))
  print(json.dumps(out), flush=True)
  return out


def point_key(row: dict) -> tuple:
  return (row["family"], row["size"], row["side"], row["depth"], row["batch"], row["steps"],
          float(row["cfg_scale"]))


def markdown(rows: List[dict]) -> str:
  head = ["size", "grid", "D", "batch", "T", "cfg", "family", "params", "ms / image",
          "x ResGen", "calls", "regime", "peak KiB / image"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  resgen = {point_key(r)[1:]: r for r in rows if r["family"] == "resgen"}
  for r in sorted(rows, key=lambda r: point_key(r)[1:] + (r["family"],)):
    base = resgen.get(point_key(r)[1:])  # the RQ-Transformer's row: at the first T
    ratio = f"{r['seconds_per_image'] / base['seconds_per_image']:.2f}" if base else "-"
    lines.append("| " + " | ".join([
        r["size"], f"{r['side']}x{r['side']}", str(r["depth"]), str(r["batch"]),
        str(r["steps"]), f"{r['cfg_scale']:g}", r["family"], f"{r['params'] / 1e6:.1f}M",
        f"{1e3 * r['seconds_per_image']:.2f}", ratio, str(r["sequential_calls"]),
        r["regime"], f"{r['peak_bytes_per_image'] / 1024:.0f}"]) + " |")
  return "\n".join(lines) + "\n"


def summary(rows: List[dict]) -> dict:
  """The issue's ratios: RQ-Transformer over ResGen time per image at every point both
  have, ResGen's depth-16 over depth-4 time, and the batch where the ordering flips."""
  at = {point_key(r): r for r in rows}
  # The RQ-Transformer takes L x D draws whatever T: one row serves every T.
  rq_at = {(r["size"], r["side"], r["depth"], r["batch"], float(r["cfg_scale"])): r
           for r in rows if r["family"] == "rq_transformer"}
  out = {"rq_over_resgen": {}, "resgen_d16_over_d4": {}, "flip_batch": {}, "max_batch": {}}
  for key, r in at.items():
    family, size, side, depth, batch, steps, cfg = key
    name = f"{size} {side}x{side} T{steps} cfg{cfg:g}"
    if family != "resgen":
      continue
    rq = rq_at.get((size, side, depth, batch, cfg))
    if rq:
      out["rq_over_resgen"][f"{name} D{depth} B{batch}"] = (
          rq["seconds_per_image"] / r["seconds_per_image"])
    d4 = at.get(("resgen", size, side, 4, batch, steps, cfg))
    if depth == 16 and d4:
      out["resgen_d16_over_d4"][f"{name} B{batch}"] = (
          r["seconds_per_image"] / d4["seconds_per_image"])
  for name in {k.rsplit(" B", 1)[0] for k in out["rq_over_resgen"]}:
    flips = sorted(int(k.rsplit(" B", 1)[1]) for k, v in out["rq_over_resgen"].items()
                   if k.rsplit(" B", 1)[0] == name and v < 1.0)
    out["flip_batch"][name] = flips[0] if flips else None
  for r in rows:
    if "max_batch" in r:
      out["max_batch"][f"{r['family']} {r['size']} {r['side']}x{r['side']} D{r['depth']} "
                       f"T{r['steps']} cfg{r['cfg_scale']:g}"] = r["max_batch"]
  return out


def plot(rows: List[dict]) -> Image.Image:
  """Time per image (ms) against depth, one line per family, one panel per batch."""
  if not rows:
    return Image.new("RGB", study.PLOT_SIZE, "white")
  first = rows[0]
  side = max(r["side"] for r in rows)
  chosen = [r for r in rows if (r["size"], r["side"], r["steps"], r["cfg_scale"]) == (
      first["size"], side, first["steps"], first["cfg_scale"])]
  panels = []
  for batch in sorted({r["batch"] for r in chosen}):
    series = {}
    for family, colour in study.COLOURS.items():
      points = sorted((r["depth"], 1e3 * r["seconds_per_image"]) for r in chosen
                      if r["family"] == family and r["batch"] == batch)
      if points:
        series[family] = (*zip(*points), colour)
    panels.append(study.line_plot(
        series, "depth D", f"ms / image, batch {batch} ({first['size']}, {side}x{side})"))
  width, height = study.PLOT_SIZE
  image = Image.new("RGB", (width * len(panels), height), "white")
  for i, panel in enumerate(panels):
    image.paste(panel, (i * width, 0))
  return image


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
  for name in PRESETS["full"]:
    parser.add_argument(f"--{name}", default=None, help="comma list (default: the preset's)")
  parser.add_argument("--families", default=",".join(compare.FAMILIES))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory_budget_gb", type=float, default=16.0,
                      help="max batch under this budget, found at the largest batch; 0: off")
  parser.add_argument("--out", default=os.path.join(compare.REPO, "bench", "results"))
  parser.add_argument("--tag", default="")
  parser.add_argument("--head_memory", action="store_true",
                      help="also ResGen's peak with all K means against the drawn one's")
  parser.add_argument("--agreement", default="",
                      help="a trained workdir: its samples in bfloat16 against float32")
  parser.add_argument("--agreement_samples", type=int, default=500)
  args = parser.parse_args()
  grid = {name: getattr(args, name) or value for name, value in PRESETS[args.preset].items()}
  sizes = grid["sizes"].split(",")
  unknown = [s for s in sizes if s not in SIZES]
  families = args.families.split(",")
  if unknown or any(f not in compare.FAMILIES for f in families):
    parser.error(f"--sizes must be in {sorted(SIZES)} and --families in {compare.FAMILIES}")
  ints = lambda s: [int(v) for v in s.split(",")]
  sides, depths, batches, steps = (ints(grid[k]) for k in ("sides", "depths", "batches",
                                                           "steps"))
  scales = [float(v) for v in grid["cfg"].split(",")]
  if min(sides + depths + batches + steps) < 1 or args.repeats < 1:
    parser.error("sides, depths, batches, steps and --repeats must be at least 1")
  platform = jax.devices()[0].platform
  path = os.path.join(args.out, f"latency_{platform}" + (f"_{args.tag}" if args.tag else ""))
  previous = {}
  if os.path.exists(path + ".json"):
    with open(path + ".json") as f:
      previous = json.load(f)
  rows = previous.get("rows", [])
  done = {point_key(r) for r in rows}
  peaks = previous.get("peaks") or device_peaks()
  print(json.dumps({"platform": platform, "device": str(jax.devices()[0]), **peaks}))

  heads = head_memory() if args.head_memory else previous.get("head_memory", [])
  agreement = previous.get("bf16_agreement", {})
  if args.agreement:
    agreement = dtype_agreement(args.agreement, args.agreement_samples, args.repeats)

  def save():
    files.save_json(path + ".json", {
        "platform": platform, "device": str(jax.devices()[0]), "peaks": peaks,
        "repeats": args.repeats, "rows": rows, "summary": summary(rows),
        "head_memory": heads, "bf16_agreement": agreement})

  for size in sizes:
    config = size_config(size)
    for side in sides:
      for depth in depths:
        target = compare.parameter_count(compare.make_task(config, depth, side))
        for batch in batches:
          for t in steps:
            for scale in scales:
              for family in families:
                key = (family, size, side, depth, batch, t, scale)
                if key in done or (family == "rq_transformer" and t != steps[0]):
                  continue  # the RQ-Transformer takes L x D draws whatever T
                start = time.perf_counter()
                budget = args.memory_budget_gb * 2 ** 30 if batch == max(batches) else 0
                rows.append(measure(config, family, size, side, depth, batch, t, scale,
                                    target, args.repeats, peaks, int(budget)))
                done.add(key)
                save()
                print(json.dumps(dict(rows[-1], wall_s=time.perf_counter() - start)),
                      flush=True)
  save()
  table = markdown(rows)
  print(table)
  print(json.dumps(summary(rows), indent=2))
  with files.atomic_write(path + ".md") as tmp, open(tmp, "w") as f:
    f.write(table)
  plot(rows).save(path + ".png")
  print(f"wrote {path}.json / .md / .png")


if __name__ == "__main__":
  main()
