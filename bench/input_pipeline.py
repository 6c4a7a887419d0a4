"""Can the input pipeline feed the chips? Images/s per host against what the stages consume.

    python -m bench.input_pipeline [--root DIR] [--workers 0,1,2,-1] [--batch 64] [--batches 6]

1. **Supply.** Images/s of the ``folder`` source at 256x256 (JPEG decode, shorter side
   resized, centre crop, random flips) through the training iterator, for each
   ``data.workers`` (0: decoded in the training process; N: N decode processes; -1: one per
   host core), on the JPEGs under ``--root`` (default: the fake ImageNet of
   ``resgen_jax.data.fake_imagenet``, 160-400 px a side; ImageNet's average ~400 x 350, so
   real files decode somewhat slower). On pods the TFDS ``imagenet2012`` stream is tf.data
   with autotuned parallel decoding; it is not measured here (no prepared ImageNet).
2. **Demand.** Model FLOPs per image (every matmul and convolution, forward and backward,
   counted from the jaxpr) of the paper tokenizer's training step (autoencoder, LPIPS,
   discriminator: ``configs/imagenet.py``) and of its encoder alone (the encode stage),
   turned into the images/s a machine consumes at ``--mfu`` of its chips' peak:
   a TPU v4-64 (32 chips, 275 TFLOP/s bf16 each, 8 hosts) and an 8x H100 box (989 TFLOP/s
   dense bf16 each, 1 host). The generator reads cached tokens: no decoding.
3. **Host cores needed** per host = consumed images/s per host / measured images/s per
   decode process.

Results: ``<out>/input_pipeline_<platform>.json``. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from bench.train_throughput import model_flops
from resgen_jax import config_base
from resgen_jax import data as data_lib
from resgen_jax.codec.tokenizer import TokenizerTask
from resgen_jax.data import fake_imagenet
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import optim, trainer
from resgen_jax.utils import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINES = {  # chips, peak bf16 FLOP/s per chip, hosts
    "tpu_v4_64": (32, 275e12, 8),
    "8x_h100": (8, 989e12, 1),
}
DEFAULT_MFU = 0.4  # a well-fed convolutional training step on these chips


def supply(root: str, workers: int, batch: int, batches: int) -> dict:
  """Images/s of the folder source's training iterator with ``workers`` decode processes
  (median batch time after one warm-up batch, which also starts the pool)."""
  config = config_base.load_config_file(os.path.join(REPO, "configs", "imagenet.py:runlocal"))
  config.data.update(path=os.path.join(root, "train"), workers=workers)
  iterator = data_lib.make_train_iterator(config.data, batch, seed=0)
  next(iterator)
  times = []
  for _ in range(batches):
    start = time.perf_counter()
    out = next(iterator)
    times.append(time.perf_counter() - start)
  assert out["image"].shape == (batch, 256, 256, 3)
  seconds = float(np.median(times))
  processes = os.cpu_count() if workers < 0 else max(1, workers)
  return {"workers": workers, "processes": processes, "batch": batch,
          "images_per_s": batch / seconds, "images_per_s_per_process": batch / seconds / processes}


def demand(lpips_weights: str) -> dict:
  """Model FLOPs per image of the paper tokenizer's training step and of its encoder."""
  config = config_base.load_config_file(os.path.join(REPO, "configs", "imagenet.py"))
  config.tokenizer.loss.perceptual_weights = lpips_weights
  config.tokenizer.loss.gan_start_step = 0  # count the discriminator's work too
  tcfg = config.tokenizer.train
  task = TokenizerTask(config.tokenizer, 3)
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  example = {"image": jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32),
             "label": jax.ShapeDtypeStruct((1,), np.int32)}
  optimizer = optim.make_optimizer(tcfg)
  key = jax.random.key(0)
  abstract, _ = trainer.state_layout(task, optimizer, key, example, tcfg.ema_decay > 0, mesh,
                                     mesh_lib.ShardingRules())
  step = trainer.make_train_step(task, optimizer, optim.learning_rate_schedule(tcfg),
                                 tcfg.ema_decay)
  train = model_flops(jax.make_jaxpr(step)(abstract, task.constants(), example, key).jaxpr)
  encode = model_flops(jax.make_jaxpr(task.tok.encode)(
      abstract.params["autoencoder"], abstract.model_state["codebook"].codebooks,
      example["image"]).jaxpr)
  return {"tokenizer_train_flop_per_image": train, "encode_flop_per_image": encode}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default=fake_imagenet.DEFAULT_ROOT)
  parser.add_argument("--workers", default="0,1,2,-1")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--mfu", type=float, default=DEFAULT_MFU)
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.root, fake_imagenet.DONE_FILE)):
    fake_imagenet.make(args.root)
  rows = [supply(args.root, int(w), args.batch, args.batches) for w in args.workers.split(",")]
  for row in rows:
    print(f"workers {row['workers']:>2} ({row['processes']} processes): "
          f"{row['images_per_s']:8.1f} images/s "
          f"({row['images_per_s_per_process']:.1f} per process)")
  flops = demand(os.path.join(args.root, fake_imagenet.LPIPS_FILE))
  per_process = max(r["images_per_s_per_process"] for r in rows if r["workers"] != 0)
  machines = {}
  for name, (chips, peak, hosts) in MACHINES.items():
    entry = {"chips": chips, "peak_flop_per_s": peak, "hosts": hosts, "mfu": args.mfu}
    for stage in ("tokenizer_train", "encode"):
      rate = chips * peak * args.mfu / flops[f"{stage}_flop_per_image"]
      entry[f"{stage}_images_per_s"] = rate
      entry[f"{stage}_host_cores_needed"] = rate / hosts / per_process
    machines[name] = entry
    print(f"{name}: the tokenizer step consumes {entry['tokenizer_train_images_per_s']:,.0f} "
          f"images/s ({entry['tokenizer_train_host_cores_needed']:.0f} decode cores per host), "
          f"encoding {entry['encode_images_per_s']:,.0f} images/s "
          f"({entry['encode_host_cores_needed']:.0f} cores per host)")
  print(f"model GFLOP per image: tokenizer step "
        f"{flops['tokenizer_train_flop_per_image'] / 1e9:.1f}, "
        f"encoder {flops['encode_flop_per_image'] / 1e9:.1f}")
  result = {"platform": jax.devices()[0].platform, "host_cores": os.cpu_count(),
            "root": args.root, "supply": rows, **flops, "machines": machines}
  path = os.path.join(args.out, f"input_pipeline_{result['platform']}.json")
  files.save_json(path, result)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
