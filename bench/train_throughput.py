"""Training throughput and model FLOPs utilisation (MFU) of the ResGen generator.

    python -m bench.train_throughput [--models digits,100m] [--steps 5] [--out bench/results]

For each model it builds the real training step (trainer.make_train_step: loss, backward,
AdamW, EMA) on the default mesh (data parallel over every device), with random weights,
codebooks and tokens, and times steps (median, compile excluded). It prints

  * examples/s, positions/s and codes/s (a position holds D codes);
  * model FLOPs per step: every matrix multiplication of the step's forward and backward
    pass, counted from its jaxpr (elementwise work and rematerialisation are not model
    FLOPs);
  * MFU: model FLOP/s over the peak FLOP/s of a large matmul in the compute dtype, measured
    in the same process on the same devices.

Runs unchanged on CPU, GPU or TPU (float32 on CPU, bfloat16 elsewhere unless --dtype says);
results go to ``<out>/train_throughput_<platform>.json``. Target on CPU: MFU >= 50% for the
~100M-parameter model.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds
from resgen_jax import config_base
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEBOOK_SIZE = 256
PEAK_MATMUL_SIZE = 4096  # large enough to reach the matmul roofline on every device kind

# name: (width, layers, heads, grid side, depth, latent dim, batch per device)
MODELS = {
    "digits": (128, 4, 4, 4, 4, 16, 64),  # configs/digits.py
    "100m": (768, 10, 12, 8, 8, 64, 32),  # ~108M parameters, the 8x8 grid of ImageNet
}


def model_flops(jaxpr) -> int:
  """FLOPs of every ``dot_general`` and ``conv_general_dilated`` in ``jaxpr`` (2 per
  multiply-add), entering nested jaxprs; a scan's body counts ``length`` times, a cond's
  costliest branch once. A convolution costs 2 x output size x kernel window x input
  features per group (its gradients are convolutions too, counted the same way)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif eqn.primitive.name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions
      kernel = eqn.invars[1].aval.shape
      window = math.prod(kernel[d] for d in rhs_spec[2:]) * kernel[rhs_spec[1]]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * window
    inner = [model_flops(getattr(sub, "jaxpr", sub)) for sub in jex.jaxprs_in_params(eqn.params)]
    if inner:
      if eqn.primitive.name == "cond":
        total += max(inner)
      else:
        total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def peak_matmul_flops(dtype, mesh, repeats: int) -> float:
  """FLOP/s of one large square matmul per device (batch-split over the mesh)."""
  n, count = PEAK_MATMUL_SIZE, mesh.devices.size
  sharding = mesh_lib.batch_sharding(mesh)
  a = jax.device_put(jnp.ones((count, n, n), dtype), sharding)
  matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
  return 2 * count * n ** 3 / median_seconds(lambda: matmul(a), repeats)


def build(name: str, dtype: str, mesh):
  width, layers, heads, side, depth, latent, per_device = MODELS[name]
  cfg = config_base.generator_config()
  cfg.model.update(width=width, num_layers=layers, num_heads=heads, dtype=dtype,
                   dropout=0.0, remat=False)
  cfg.train.update(batch_size=per_device * mesh.devices.size)
  books = np.random.default_rng(0).normal(size=(depth, CODEBOOK_SIZE, latent))
  task = GeneratorTask(cfg, books.astype(np.float32), side * side, depth, num_classes=1000)
  rng = np.random.default_rng(1)
  batch = mesh_lib.global_batch(
      {"codes": rng.integers(0, CODEBOOK_SIZE, (cfg.train.batch_size, side, side, depth),
                             dtype=np.int32),
       "label": rng.integers(0, 1000, (cfg.train.batch_size,), dtype=np.int32)}, mesh)
  return task, cfg.train, batch


def measure(name: str, dtype: str, mesh, steps: int, peak: float) -> dict:
  task, tcfg, batch = build(name, dtype, mesh)
  optimizer = optim.make_optimizer(tcfg)
  key = jax.random.key(0)
  _, shardings = trainer.state_layout(task, optimizer, key, batch, True, mesh,
                                      mesh_lib.ShardingRules())
  state = trainer.create_train_state(task, optimizer, key, batch, True, shardings)
  step_fn = trainer.make_train_step(task, optimizer, optim.learning_rate_schedule(tcfg),
                                    tcfg.ema_decay)
  constants = task.constants()
  flops = model_flops(jax.make_jaxpr(step_fn)(state, constants, batch, key).jaxpr)
  step = jax.jit(step_fn, out_shardings=(shardings, mesh_lib.replicated(mesh)))
  seconds = median_seconds(lambda: step(state, constants, batch, key), steps)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  codes = batch["codes"]
  examples, positions = codes.shape[0], codes.shape[0] * codes.shape[1] * codes.shape[2]
  return {
      "model": name, "parameters": int(params), "batch": int(examples),
      "positions_per_example": int(codes.shape[1] * codes.shape[2]),
      "depth": int(codes.shape[3]), "step_ms": 1e3 * seconds,
      "examples_per_s": examples / seconds, "positions_per_s": positions / seconds,
      "codes_per_s": positions * codes.shape[3] / seconds,
      "model_tflop_per_step": flops / 1e12, "model_tflop_per_s": flops / seconds / 1e12,
      "mfu": flops / seconds / peak,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="digits,100m")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
  parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on "
                      "CPU, bfloat16 elsewhere)")
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  args = parser.parse_args()
  platform = jax.devices()[0].platform
  dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  peak = peak_matmul_flops(jnp.dtype(dtype), mesh, args.steps)
  rows = [measure(name, dtype, mesh, args.steps, peak) for name in args.models.split(",")]
  print(f"{platform} x {mesh.devices.size}, {dtype}; peak matmul "
        f"{peak / 1e12:.3f} TFLOP/s ({PEAK_MATMUL_SIZE}^3 per device)")
  print("| model | params | batch | step | examples/s | codes/s | model TFLOP/step | "
        "TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['batch']} | "
          f"{r['step_ms']:.0f} ms | {r['examples_per_s']:.1f} | {r['codes_per_s']:.0f} | "
          f"{r['model_tflop_per_step']:.3f} | {r['model_tflop_per_s']:.3f} | "
          f"{100 * r['mfu']:.0f}% |")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"train_throughput_{platform}.json")
  with open(path, "w") as f:
    json.dump({"platform": platform, "devices": int(mesh.devices.size), "dtype": dtype,
               "peak_matmul_tflop_per_s": peak / 1e12, "steps": args.steps, "rows": rows},
              f, indent=2)
  print("wrote", path)


if __name__ == "__main__":
  main()
