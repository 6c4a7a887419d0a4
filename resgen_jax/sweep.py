"""Sampling sweep: sampler steps x CFG scale x temperature -> quality and wall-clock time.

    python -m resgen_jax.sweep --config=configs/digits.py --workdir=DIR \
        --steps=4,8,16 --cfg_scales=1,2 --temperatures=1.0 [--name=sweep]

On a workdir whose tokenizer and generator are trained, each combination draws its sample
set (``--mode=sample`` with those settings; an existing set is reused) and evaluates it
(``--mode=evaluate``, with ``config.evaluation``'s extractor). Writes
``DIR/sweeps/<name>.json`` (one row per combination), ``<name>.md`` (the table) and
``<name>.png`` (quality against sampling time per image, as in the paper's figure 2).
Times are sampling alone (compile excluded), on the devices this process sees.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, List, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from resgen_jax import stages
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.utils import files

SWEEPS_DIR = "sweeps"
# The quality number plotted, per extractor: lower is better for both.
PLOTTED = {"classifier": "frechet_distance", "inception": "fid", "resnet": "frechet_distance"}
PLOT_SIZE, PLOT_MARGIN = (640, 480), 60

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's directory.")
_STEPS = flags.DEFINE_list("steps", ["4", "8", "16"], "Sampler steps T.")
_CFG = flags.DEFINE_list("cfg_scales", ["1"], "Classifier-free guidance scales.")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["1"], "Sampling temperatures.")
_NAME = flags.DEFINE_string("name", "sweep", "Name of the output files.")


def run_sweep(config, workdir: str, steps: Sequence[int], cfg_scales: Sequence[float],
              temperatures: Sequence[float], name: str = "sweep") -> List[dict]:
  """Samples and evaluates every combination; writes the json, table and plot; -> rows."""
  if not steps or not cfg_scales or not temperatures:
    raise ValueError("each of steps, cfg_scales and temperatures needs at least one value")
  mesh = mesh_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  metric = PLOTTED[stages.extractors.evaluation_settings(config.evaluation)["extractor"]]
  rows = []
  for t, w, temperature in itertools.product(steps, cfg_scales, temperatures):
    run = config.copy_and_resolve_references()
    run.sampler.update(steps=int(t), cfg_scale=float(w), temperature=float(temperature),
                       tag="")
    samples = stages.sample.run(run, workdir, mesh)
    report = stages.evaluate.run(run, workdir, mesh)
    with np.load(samples, allow_pickle=False) as data:  # sets drawn before timing: NaN
      seconds = (float(data["seconds_per_image"]) if "seconds_per_image" in data.files
                 else float("nan"))
    rows.append({"steps": int(t), "cfg_scale": float(w), "temperature": float(temperature),
                 "seconds_per_image": seconds, "samples": samples,
                 **{k: v for k, v in report["generated"].items()}})
  out = os.path.join(workdir, SWEEPS_DIR, name)
  files.save_json(out + ".json", {"metric": metric, "rows": rows})
  with files.atomic_write(out + ".md") as tmp, open(tmp, "w") as f:
    f.write(markdown_table(rows, metric))
  plot(rows, metric).save(out + ".png")
  return rows


def markdown_table(rows: Sequence[dict], metric: str) -> str:
  scores = [k for k in rows[0] if k not in ("steps", "cfg_scale", "temperature",
                                            "seconds_per_image", "samples")]
  head = ["T", "CFG", "temperature", "ms / image", *scores]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [str(r["steps"]), f"{r['cfg_scale']:g}", f"{r['temperature']:g}",
             f"{1e3 * r['seconds_per_image']:.2f}", *(f"{r[k]:.4g}" for k in scores)]
    lines.append("| " + " | ".join(cells) + " |")
  return f"Plotted: {metric} (lower is better)\n\n" + "\n".join(lines) + "\n"


def sweep_label(row: dict) -> str:
  return f"T{row['steps']} w{row['cfg_scale']:g} t{row['temperature']:g}"


def plot(rows: Sequence[dict], metric: str,
         label: Callable[[dict], str] = sweep_label) -> Image.Image:
  """A scatter of ``metric`` against milliseconds per image (``seconds_per_image``), each
  point labelled by ``label(row)`` (rows without a time are left out)."""
  width, height = PLOT_SIZE
  m = PLOT_MARGIN
  image = Image.new("RGB", PLOT_SIZE, "white")
  draw = ImageDraw.Draw(image)
  rows = [r for r in rows if np.isfinite(r["seconds_per_image"])]
  if not rows:
    return image
  xs = np.array([1e3 * r["seconds_per_image"] for r in rows])
  ys = np.array([r[metric] for r in rows])
  span = lambda v: (v.min(), v.max() if v.max() > v.min() else v.min() + 1.0)
  (x0, x1), (y0, y1) = span(xs), span(ys)
  to_px = lambda x, y: (m + (x - x0) / (x1 - x0) * (width - 2 * m),
                        height - m - (y - y0) / (y1 - y0) * (height - 2 * m))
  draw.line([(m, m), (m, height - m), (width - m, height - m)], fill="black")
  for frac in (0.0, 0.5, 1.0):
    x, y = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
    px, _ = to_px(x, y0)
    _, py = to_px(x0, y)
    draw.text((px - 10, height - m + 8), f"{x:.3g}", fill="black")
    draw.text((8, py - 6), f"{y:.3g}", fill="black")
  draw.text((width // 2 - 40, height - 24), "ms per image", fill="black")
  draw.text((8, 16), metric, fill="black")
  for r, x, y in zip(rows, xs, ys):
    px, py = to_px(x, y)
    draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="blue")
    draw.text((px + 6, py - 12), label(r), fill="black")
  return image


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = run_sweep(_CONFIG.value, _WORKDIR.value, [int(v) for v in _STEPS.value],
                   [float(v) for v in _CFG.value], [float(v) for v in _TEMPERATURES.value],
                   _NAME.value)
  print(markdown_table(rows, PLOTTED[_CONFIG.value.evaluation.extractor]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
