"""Sampler cost: is it T network calls and nothing more, whatever the depth D?

    python -m bench.sampler [--batch 256] [--steps 8] [--repeats 7] [--out bench/results]

For the digits-size generator (configs/digits.py: width 128, 4 layers, 4x4 grid) with random
weights and codebooks, it times (medians over repeats, compile excluded):
  * T forward passes of the network on a batch, chained in one jitted loop,
  * the whole jitted sampler (T steps: network + component choice + re-quantization +
    confidence ranking),
and prints the overhead ratio ``sample / (T x forward)`` (target <= 1.15) at D = 4, 8, 16
with the same T and width, and the ratio of sampling times D16 / D4 (target <= 1.2).
Runs unchanged on CPU, GPU or TPU; results go to ``<out>/sampler_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds
from resgen_jax import config_base
from resgen_jax.generator import sampler
from resgen_jax.generator.task import GeneratorTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHS = (4, 8, 16)
CODEBOOK_SIZE = 64
LATENT_DIM = 16


def digits_config():
  return config_base.load_config_file(os.path.join(REPO, "configs", "digits.py"))


def measure(depth: int, config, batch: int, repeats: int) -> dict:
  grid = 4 * 4
  books = np.random.default_rng(depth).normal(size=(depth, CODEBOOK_SIZE, LATENT_DIM))
  task = GeneratorTask(config.generator, books.astype(np.float32), grid, depth,
                       config.data.num_classes)
  example = {"codes": jnp.zeros((batch, grid, depth), jnp.int32),
             "label": jnp.zeros((batch,), jnp.int32)}
  params, state = task.init(jax.random.key(0), example)
  labels = jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes
  valid = jnp.ones((batch, grid), bool)
  codebooks = task.codebooks
  known = jnp.zeros((batch, grid, depth), bool)

  steps = config.sampler.steps

  @jax.jit
  def forward_t_times(params, codes, hidden):
    """T network calls chained in one jitted loop (each call's input depends on the last
    output), so the baseline pays dispatch once, like the sampler."""
    network = task.network_fn(params, state, codebooks, labels, valid)

    def body(_, hidden):
      logits, _ = network(codes, hidden, True)
      return jnp.where(logits[..., 0] > 1e30, 0, hidden)  # a dependency, never taken
    return jax.lax.fori_loop(0, steps, body, hidden)

  @jax.jit
  def sample(params, rng):
    network = task.network_fn(params, state, codebooks, labels, valid)
    return sampler.sample(network, codebooks, example["codes"], known, rng,
                          config.sampler).codes

  codes = example["codes"]
  hidden = jnp.full((batch, grid), depth // 2, jnp.int32)
  t_forwards = median_seconds(lambda: forward_t_times(params, codes, hidden), repeats)
  t_sample = median_seconds(lambda: sample(params, jax.random.key(1)), repeats)
  return {"depth": depth, "forward_s": t_forwards / steps, "sample_s": t_sample,
          "overhead": t_sample / t_forwards}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  args = parser.parse_args()
  config = digits_config()
  config.sampler.steps = args.steps
  rows = [measure(d, config, args.batch, args.repeats) for d in DEPTHS]
  platform = jax.devices()[0].platform
  print(f"platform {platform} ({jax.device_count()} devices), batch {args.batch}, "
        f"T = {args.steps}, medians of {args.repeats}")
  print(f"{'D':>3} {'forward ms':>11} {'sample ms':>10} {'sample/(T*fwd)':>15}")
  for r in rows:
    print(f"{r['depth']:>3} {1e3 * r['forward_s']:>11.2f} {1e3 * r['sample_s']:>10.2f} "
          f"{r['overhead']:>15.3f}")
  ratio = rows[-1]["sample_s"] / rows[0]["sample_s"]
  print(f"sampling time D16 / D4: {ratio:.3f}  (target <= 1.2); "
        f"overhead at D4: {rows[0]['overhead']:.3f} (target <= 1.15)")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"sampler_{platform}.json")
  with open(path, "w") as f:
    json.dump({"platform": platform, "devices": jax.device_count(), "batch": args.batch,
               "steps": args.steps, "repeats": args.repeats, "rows": rows,
               "d16_over_d4": ratio}, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
