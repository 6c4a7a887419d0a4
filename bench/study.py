"""The paper's claims on data: ResGen against the baselines and against its own depth.

    python -m bench.study run --data digits --workdir /tmp/study \
        [--families resgen,direct,rq_transformer] [--depths 4,8,16] [--seeds 0,1,2] \
        [--train_steps 1000] [--samples 2000] [--variant base --set generator.loss.x=y ...] \
        [--sampler name:field=value,field=value ...]
    python -m bench.study report --data digits      # tables and plots from finished runs
    python -m bench.study pack --data cifar10 --workdir /tmp/study   # the base, for git

One tokenizer per data set, at depth ``MAX_DEPTH`` with quantizer dropout (so every depth
prefix decodes), is trained once under ``WORKDIR/<data>/base`` with its token cache; every
generator run reads a depth prefix of those codes (``generator.token_depth``), so families
and depths see the same latents and only the generator varies. Each baseline is matched to
ResGen's parameter count by its number of layers (``bench.compare.matched_config``); the
steps, batch, schedule, EMA and data order (the seed) are the same for every family.

A run is (variant, family, depth, seed): ``--variant`` names a set of ``--set`` config
overrides (an ablation; ``base`` is the config as it is). Each trained run is sampled with
every ``--sampler`` setting (``name:field=value,...`` over ``config.sampler``; ``default``
is the config's sampler): ``--samples`` images, classes in turn, scored by the evaluation
extractor (Frechet distance, class agreement, precision/recall, against the held-out split),
with a bootstrap over the samples for the Frechet distance's own noise, and the sampling
time per image. Every finished (run, sampler) writes its own
``<out>/<data>/<variant>/<family>_d<D>_s<seed>__<sampler>.json``, and a rerun skips it: the
study goes on in pieces, each result committed as it lands.

``pack`` writes the base tokenizer (its last checkpoint, the base's ``config.json``, and
the report and image spec once it has finished; about 10 MB for CIFAR-10) to
``<out>/<data>/base.tar.gz``; ``run`` unpacks it into an empty base and goes on from there:
a finished tokenizer is not trained again (a new machine only re-encodes), an unfinished
one resumes from its checkpoint (a base of another config is refused by the usual
run-config check).

``report`` aggregates what exists: per variant, sampler, family and depth the mean and std
over seeds (``table.md``, ``summary.json``), quality against sampling time (the paper's
figure 2, ``quality_vs_time.png``) and learning curves (``train/fid_proxy`` against the
step, ``curves_d<D>.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tarfile
from typing import Dict, List, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from bench import compare
from resgen_jax import config_base, stages
from resgen_jax.codec import token_cache
from resgen_jax.evaluation import features as features_lib
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import trainer
from resgen_jax.utils import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
OUT = os.path.join(REPO, "bench", "results", "study")
MAX_DEPTH = 16  # the shared tokenizer's depth; runs take prefixes of its codes
BASE_DIR, RUNS_DIR = "base", "runs"  # WORKDIR/<data>/base, WORKDIR/<data>/runs/<variant>/
# Shared with every run of a data set (symlinked): the tokenizer, its codes, the classifier.
SHARED_DIRS = ("tokenizer", token_cache.TOKENS_DIR, stages.extractors.EVALUATION_DIR)
BOOTSTRAP_DRAWS = 50  # resamples of the sample set for the Frechet distance's noise
PROXY_POINTS = 5  # train/fid_proxy evaluations over a run (the learning curve)
PROXY_SAMPLES = 500
CIFAR_TOKENIZER_STEPS = 2000  # ~50 min on 2 cores (0.7 steps/s); pack it once trained
REQUANT_DRAWS, REQUANT_BATCH = 3, 1000  # masks per held-out example; examples per call
BASE_ARCHIVE = "base.tar.gz"  # <out>/<data>/: the packed base tokenizer (``pack``)
# What a packed base holds (paths under the base) besides the last checkpoint: the config,
# then what only a finished tokenizer has (packed when present).
PACKED = (stages.run_config.CONFIG_FILE, os.path.join("tokenizer", stages.tokenizer.RESULTS_FILE),
          os.path.join("tokenizer", stages.tokenizer.IMAGE_SPEC_FILE))
PLOT_SIZE, PLOT_MARGIN = (720, 480), 60
COLOURS = {"resgen": "blue", "direct": "green", "rq_transformer": "red"}


def extract_cifar(workdir: str) -> str:
  """The CIFAR-10 JPEG class folders, unpacked once under ``workdir``. -> their root."""
  root = os.path.join(workdir, "cifar10_jpeg")
  done = os.path.join(root, ".complete")
  if not os.path.exists(done):
    with tarfile.open(os.path.join(SHARED_DATA, "cifar10", "cifar10-jpeg.tar.gz")) as tar:
      tar.extractall(root, filter="data")
    open(done, "w").close()
  return root


def data_config(data: str, workdir: str):
  """configs/digits.py adapted to ``data``, tokenizer at MAX_DEPTH with quantizer dropout:

  * ``digits``: as it is (16x16 -> 4x4 grid, 64 codes);
  * ``mnist``: 28x28 -> 7x7 grid through the ``npz`` source;
  * ``cifar10``: the JPEG class folders through the ``folder`` source, 32x32 -> 8x8 (the
    paper's grid), a wider tokenizer with 256 codes per depth so that reconstruction keeps
    improving with depth, scored by the pretrained ResNet-20 (``evaluation.extractor=
    resnet``), not by a classifier trained here.
  """
  config = config_base.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  config.tokenizer.quantizer.depth = MAX_DEPTH
  if data == "mnist":
    folder = os.path.join(SHARED_DATA, "mnist")
    config.data.update(name="npz", path=os.path.join(folder, "train.npz"),
                       eval_path=os.path.join(folder, "test.npz"), image_size=28)
    # The flatten classifier: 0.991 held-out accuracy after 1500 steps (mean pooling: 0.960
    # after 3000), above the >= 0.98 a scorer of generated digits needs.
    config.evaluation.update(classifier_pool="flatten", classifier_steps=1500)
  elif data == "cifar10":
    root = extract_cifar(os.path.join(workdir, data))
    config.data.update(name="folder", path=os.path.join(root, "train"),
                       eval_path=os.path.join(root, "test"), image_size=32)
    tok = config.tokenizer
    # PSNR by depth prefix after 1000 steps (eval at D1 / D4 / D8 / D16): latent 16: 23.8 /
    # 29.1 / - / 30.1 dB (30.06 at D10); latent 32: 23.9 / 29.0 / 29.9 / 30.1, at half the
    # steps/s (0.35 against 0.69 on 2 cores). Either way reconstruction is flat from about
    # D8: this 32-channel autoencoder, not the codes, is the limit, so the depth claim needs
    # a larger or longer-trained tokenizer (an accelerator's budget).
    tok.model.update(channels=32, latent_dim=32)
    tok.quantizer.codebook_size = 256
    tok.train.update(num_steps=CIFAR_TOKENIZER_STEPS, eval_examples=1000, eval_every=1000,
                     checkpoint_every=1000)
    config.evaluation.update(
        extractor="resnet", batch_size=500,
        resnet_weights=os.path.join(SHARED_DATA, "cifar10_resnet", "resnet20_state_dict.npz"))
  elif data != "digits":
    raise ValueError(f"--data must be digits, mnist or cifar10, got {data!r}")
  return config


def set_field(config, assignment: str) -> None:
  """Applies ``dotted.field=value`` (value parsed as JSON, else kept as a string)."""
  if "=" not in assignment:
    raise ValueError(f"--set wants field=value, got {assignment!r}")
  field, raw = assignment.split("=", 1)
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  *parents, leaf = field.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise ValueError(f"--set: the config has no field {field!r}")
  node[leaf] = tuple(value) if isinstance(value, list) else value


def parse_sampler(spec: str):
  """``name:field=value,...`` -> ``(name, {field: value})``; ``default`` -> no changes."""
  name, _, body = spec.partition(":")
  settings = {}
  for item in filter(None, body.split(",")):
    field, _, raw = item.partition("=")
    try:
      settings[field] = json.loads(raw)
    except json.JSONDecodeError:
      settings[field] = raw
  return name, settings


def pack_base(workdir: str, archive: str) -> None:
  """The base's tokenizer (last checkpoint, config.json; the report and image spec when it
  has finished) as a tar.gz at ``archive``; the checkpoint is the whole training state
  (optimizer and data position too), so an unfinished tokenizer resumes exactly."""
  base = os.path.join(workdir, BASE_DIR)
  step = trainer.latest_checkpoint_step(os.path.join(base, "tokenizer"))
  if step is None or not os.path.exists(os.path.join(base, stages.run_config.CONFIG_FILE)):
    raise SystemExit(f"{base} holds no tokenizer checkpoint and config.json to pack")
  checkpoint = os.path.join("tokenizer", "checkpoints", str(step))
  present = [p for p in PACKED if os.path.exists(os.path.join(base, p))]
  with files.atomic_write(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
    for path in present + [checkpoint]:
      tar.add(os.path.join(base, path), arcname=path)
  print(f"wrote {archive} ({os.path.getsize(archive) / 2 ** 20:.1f} MiB, tokenizer step "
        f"{step}{'' if len(present) == len(PACKED) else ', unfinished'})")


def unpack_base(archive: str, base: str) -> bool:
  """Unpacks a packed base into ``base`` when it holds no tokenizer yet. -> whether it did."""
  if not os.path.exists(archive) or os.path.exists(os.path.join(base, "tokenizer")):
    return False
  os.makedirs(base, exist_ok=True)
  with tarfile.open(archive) as tar:
    tar.extractall(base, filter="data")
  print(f"unpacked the base tokenizer from {archive}", flush=True)
  return True


def prepare_base(config, workdir: str, archive: str = "") -> str:
  """Trains the shared tokenizer (or unpacks ``archive``, see :func:`pack_base`) and
  encodes the data (resumable); trains the evaluation classifier once. -> the base."""
  base = os.path.join(workdir, BASE_DIR)
  if archive:
    unpack_base(archive, base)
  stages.run(config, base, stages=("tokenizer", "encode"))
  if config.evaluation.extractor == "classifier":
    stages.extractors.classifier_params(config, base)
  return base


def run_dir_for(workdir: str, variant: str, family: str, depth: int, seed: int) -> str:
  run = os.path.join(workdir, RUNS_DIR, variant, f"{family}_d{depth}_s{seed}")
  os.makedirs(run, exist_ok=True)
  for name in SHARED_DIRS:
    link = os.path.join(run, name)
    if not os.path.lexists(link):
      os.symlink(os.path.join(os.path.abspath(workdir), BASE_DIR, name), link)
  return run


def bootstrap_frechet(reference: features_lib.Reference, features: np.ndarray,
                      draws: int, seed: int) -> dict:
  """Mean and std of the Frechet distance over ``draws`` resamples (with replacement) of
  the sample features ``[N, F]``: the metric's noise from the finite sample set."""
  rng = np.random.default_rng(seed)
  values = [reference.frechet_distance(features[rng.integers(0, len(features), len(features))])
            for _ in range(draws)]
  return {"frechet_bootstrap_mean": float(np.mean(values)),
          "frechet_bootstrap_std": float(np.std(values)),
          "frechet_bootstrap_95": [float(np.percentile(values, 2.5)),
                                   float(np.percentile(values, 97.5))]}


def learning_curve(run: str) -> List[List[float]]:
  """``[[step, fid_proxy], ...]`` from the run's metrics.jsonl."""
  path = os.path.join(run, "metrics.jsonl")
  curve = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if row.get("stage") == "generator" and "train/fid_proxy" in row:
          curve.append([row["step"], row["train/fid_proxy"]])
  return curve


def last_train_metrics(run: str) -> dict:
  """The generator's last logged train metrics (loss, per-k NLL, sigma)."""
  last = {}
  with open(os.path.join(run, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row.get("stage") == "generator" and "train/loss" in row:
        last = row
  return {k: v for k, v in last.items() if k.startswith("train/")}


def requantization_report(config, run: str, mesh, draws: int = REQUANT_DRAWS) -> dict:
  """ResGen only: how often re-quantizing the most probable component's mean recovers the
  held-out tokens (``GeneratorTask.requantization_matches``), under ``draws`` training
  masks per example: at the first hidden depth by hidden count k = 1..D, and over all
  hidden slots by depth."""
  task, state = stages.generator.load(config, run, mesh)
  codes, labels = token_cache.load_tokens(run, config.data.eval_split)
  codes = codes[..., :task.depth]
  fn = jax.jit(task.requantization_matches)
  totals = {}
  for draw in range(draws):
    for first in range(0, len(codes), REQUANT_BATCH):
      batch = {"codes": codes[first:first + REQUANT_BATCH],
               "label": labels[first:first + REQUANT_BATCH]}
      out = fn(state.eval_params(), state.model_state, task.constants(), batch,
               jax.random.fold_in(jax.random.key(draw), first))
      for k, v in out.items():
        totals[k] = totals.get(k, 0) + np.asarray(v, np.int64)
  rate = lambda hit, count: [float(h / c) if c else None for h, c in zip(hit, count)]
  return {"first_hidden_match_by_k": rate(totals["first_hit"], totals["first_count"]),
          "hidden_match_by_depth": rate(totals["depth_hit"], totals["depth_count"])}


def score(config, run: str, mesh) -> dict:
  """Samples and evaluates the run with ``config.sampler``; adds the bootstrap."""
  samples = stages.sample.run(config, run, mesh)
  report = stages.evaluate.run(config, run, mesh)
  extractor = stages.extractors.feature_extractor(config, run)
  reference = features_lib.Reference.from_features(
      stages.extractors.heldout_features(config, extractor)[0])
  with np.load(samples, allow_pickle=False) as data:
    features, _ = features_lib.extract(extractor, np.array_split(
        data["arr_0"], max(1, len(data["arr_0"]) // config.evaluation.batch_size)))
    seconds = float(data["seconds_per_image"])
  out = dict(report["generated"], seconds_per_image=seconds,
             real_heldout=report.get("real_heldout"))
  out.update(bootstrap_frechet(reference, features, BOOTSTRAP_DRAWS, config.seed))
  return out


def run_study(args) -> None:
  config = data_config(args.data, args.workdir)
  workdir = os.path.join(args.workdir, args.data)
  # the same for every variant
  base = prepare_base(config, workdir, os.path.join(args.out, args.data, BASE_ARCHIVE))
  for assignment in args.set:
    set_field(config, assignment)
  meta, books = token_cache.load_meta(base)
  side = meta["grid"][0]
  out_dir = os.path.join(args.out, args.data, args.variant)
  samplers = [parse_sampler(s) for s in args.sampler] or [("default", {})]
  mesh = mesh_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  with open(os.path.join(base, "tokenizer", stages.tokenizer.RESULTS_FILE)) as f:
    files.save_json(os.path.join(args.out, args.data, "tokenizer.json"), json.load(f))
  for depth in args.depths:
    target = compare.parameter_count(compare.make_task(
        family_depth_config(config, "resgen", depth), depth, side, books))
    for family in args.families:
      for seed in args.seeds:
        pending = [(n, s) for n, s in samplers if not os.path.exists(
            os.path.join(out_dir, f"{family}_d{depth}_s{seed}__{n}.json"))]
        if not pending:
          continue
        run_config, params = compare.matched_config(family_depth_config(config, family, depth),
                                                    family, depth, target, side, books)
        run_config.seed = seed
        run_config.generator.train.num_steps = args.train_steps
        run_config.evaluation.proxy_every = max(1, args.train_steps // PROXY_POINTS)
        run_config.evaluation.proxy_samples = PROXY_SAMPLES
        run_config.sampler.samples_per_class = args.samples // config.data.num_classes
        run_config.sampler.batch_size = args.sampler_batch
        run = run_dir_for(workdir, args.variant, family, depth, seed)
        stages.run(run_config, run, stages=("generator",))
        diagnostics = (requantization_report(run_config, run, mesh) if family == "resgen"
                       else {})
        for name, settings in pending:
          scfg = run_config.copy_and_resolve_references()
          scfg.sampler.update(settings)
          result = {"data": args.data, "variant": args.variant, "overrides": args.set,
                    "family": family, "depth": depth, "seed": seed, "params": params,
                    "num_layers": run_config.generator.model.num_layers,
                    "train_steps": args.train_steps, "sampler_name": name,
                    "sampler": scfg.sampler.to_dict(), "platform": jax.devices()[0].platform,
                    "curve": learning_curve(run),
                    "curve_sampler": sampler_label(run_config.sampler.to_dict(), family),
                    "train": last_train_metrics(run),
                    **diagnostics}
          result.update(score(scfg, run, mesh))
          files.save_json(os.path.join(out_dir, f"{family}_d{depth}_s{seed}__{name}.json"),
                          result)
          print(json.dumps({k: result[k] for k in (
              "variant", "family", "depth", "seed", "sampler_name", "frechet_distance",
              "frechet_bootstrap_std", "class_agreement", "seconds_per_image")}), flush=True)


def family_depth_config(config, family: str, depth: int):
  config = config.copy_and_resolve_references()
  config.generator.family = family
  config.generator.token_depth = depth
  return config


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def load_results(folder: str) -> List[dict]:
  rows = []
  for root, _, names in os.walk(folder):
    for name in sorted(names):
      if name.endswith(".json") and "__" in name:
        with open(os.path.join(root, name)) as f:
          rows.append(json.load(f))
  return rows


# Sampler fields a label names when they differ from these values, and what runs made
# before a field existed did (confidence_depths: "each" until it became a setting).
LABELLED_SAMPLER = {"confidence": "codebook", "confidence_temperature": 1.0,
                    "sigma_noise": 0.0, "mean_noise": 0.0, "cfg_scale": 1.0,
                    "guide_means": True, "temperature": 1.0, "top_p": 1.0}
UNSET_SAMPLER = {"confidence_depths": "each", "confidence": "codebook", "sigma_noise": 0.0,
                 "guide_means": True}


def sampler_label(sampler: dict, family: str) -> str:
  """What a run's sampler did, from its recorded settings (not its name, whose meaning
  changes with the config's defaults): ``T<steps> <confidence_depths>`` and the fields of
  LABELLED_SAMPLER that differ; the RQ-Transformer draws token by token: ``AR``."""
  get = lambda k: sampler.get(k, UNSET_SAMPLER.get(k))
  if family == "rq_transformer":
    head = "AR"
  else:
    head = f"T{get('steps')} {get('confidence_depths')}"
  extras = [f"{k}={get(k)}" for k, v in LABELLED_SAMPLER.items()
            if get(k) is not None and get(k) != v
            and not (family != "resgen" and k in ("confidence", "sigma_noise", "guide_means"))]
  return " ".join([head] + extras)


def summarize(rows: Sequence[dict]) -> List[dict]:
  """Mean and std over seeds of every (variant, sampler, family, depth); the sampler is
  named by :func:`sampler_label` (sets drawn twice with the same settings count once)."""
  groups: Dict[tuple, Dict[int, dict]] = {}
  for r in rows:
    key = (r["variant"], sampler_label(r["sampler"], r["family"]), r["family"], r["depth"])
    groups.setdefault(key, {})[r["seed"]] = r
  groups = {k: list(v.values()) for k, v in groups.items()}
  out = []
  for (variant, sampler, family, depth), runs in sorted(groups.items()):
    stat = lambda key: [float(r[key]) for r in runs]
    entry = {"variant": variant, "sampler": sampler, "family": family, "depth": depth,
             "seeds": len(runs), "params": runs[0]["params"],
             "train_steps": runs[0]["train_steps"]}
    for key in ("frechet_distance", "class_agreement", "precision", "recall",
                "seconds_per_image", "frechet_bootstrap_std"):
      values = stat(key)
      entry[key] = statistics.mean(values)
      entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else float("nan")
    out.append(entry)
  return out


def markdown(summary: Sequence[dict]) -> str:
  head = ["variant", "sampler", "family", "D", "params", "steps", "seeds",
          "Frechet (mean +- std over seeds)", "bootstrap std", "class agreement",
          "precision", "recall", "ms / image"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    lines.append("| " + " | ".join([
        s["variant"], s["sampler"], s["family"], str(s["depth"]), f"{s['params'] / 1e6:.2f}M",
        str(s["train_steps"]), str(s["seeds"]),
        f"{s['frechet_distance']:.2f} +- {s['frechet_distance_std']:.2f}",
        f"{s['frechet_bootstrap_std']:.2f}",
        f"{s['class_agreement']:.3f} +- {s['class_agreement_std']:.3f}",
        f"{s['precision']:.3f}", f"{s['recall']:.3f}",
        f"{1e3 * s['seconds_per_image']:.2f}"]) + " |")
  return "\n".join(lines) + "\n"


def headline(summary: Sequence[dict], variant: str = "base", steps: int = 8) -> str:
  """The README's table: per family and depth, the Frechet distance (mean +- std over
  seeds) under both reveal rules at T = ``steps`` (one column for the RQ-Transformer, which
  draws token by token), and class agreement and recall of the better rule."""
  rows = {}
  for s in summary:
    if s["variant"] != variant:
      continue
    rule = "AR" if s["sampler"] == "AR" else s["sampler"].replace(f"T{steps} ", "", 1)
    if rule in ("AR", "each", "first"):
      rows.setdefault((s["family"], s["depth"]), {})[rule] = s
  fmt = lambda s: (f"{s['frechet_distance']:.2f} +- {s['frechet_distance_std']:.2f} "
                   f"({s['seeds']})" if s else "-")
  lines = ["| family | D | Frechet, each (seeds) | Frechet, first (seeds) | class agreement "
           "| recall |", "|---|---|---|---|---|---|"]
  order = {f: i for i, f in enumerate(COLOURS)}
  for (family, depth), rules in sorted(rows.items(), key=lambda kv: (kv[0][1],
                                                                      order[kv[0][0]])):
    each, first = rules.get("each", rules.get("AR")), rules.get("first", rules.get("AR"))
    best = min((r for r in (each, first) if r), key=lambda r: r["frechet_distance"])
    lines.append(f"| {family} | {depth} | {fmt(each)} | {fmt(first)} | "
                 f"{best['class_agreement']:.3f} | {best['recall']:.3f} |")
  return "\n".join(lines) + "\n"


def line_plot(series: Dict[str, tuple], xlabel: str, ylabel: str) -> Image.Image:
  """Lines of ``label -> (xs, ys, colour[, point names])`` on shared axes (PIL; no
  plotting library)."""
  width, height = PLOT_SIZE
  m = PLOT_MARGIN
  image = Image.new("RGB", PLOT_SIZE, "white")
  draw = ImageDraw.Draw(image)
  points = [(x, y) for xs, ys, *_ in series.values() for x, y in zip(xs, ys)]
  if not points:
    return image
  xs_all, ys_all = np.array(points).T
  span = lambda v: (v.min(), v.max() if v.max() > v.min() else v.min() + 1.0)
  (x0, x1), (y0, y1) = span(xs_all), span(ys_all)
  to_px = lambda x, y: (m + (x - x0) / (x1 - x0) * (width - 2 * m - 120),
                        height - m - (y - y0) / (y1 - y0) * (height - 2 * m))
  draw.line([(m, m), (m, height - m), (width - m - 120, height - m)], fill="black")
  for frac in (0.0, 0.5, 1.0):
    px, _ = to_px(x0 + frac * (x1 - x0), y0)
    _, py = to_px(x0, y0 + frac * (y1 - y0))
    draw.text((px - 10, height - m + 8), f"{x0 + frac * (x1 - x0):.3g}", fill="black")
    draw.text((8, py - 6), f"{y0 + frac * (y1 - y0):.3g}", fill="black")
  draw.text((width // 2 - 60, height - 24), xlabel, fill="black")
  draw.text((8, 16), ylabel, fill="black")
  for i, (label, (xs, ys, colour, *names)) in enumerate(series.items()):
    pixels = [to_px(x, y) for x, y in zip(xs, ys)]
    if len(pixels) > 1:
      draw.line(pixels, fill=colour, width=2)
    for j, (px, py) in enumerate(pixels):
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
      if names:  # a name per point
        draw.text((px + 5, py - 12), names[0][j], fill=colour)
    draw.text((width - m - 110, m + 14 * i), label, fill=colour)
  return image


def file_name(label: str) -> str:
  return label.replace(" ", "_").replace("=", "")


def report(args) -> None:
  folder = os.path.join(args.out, args.data)
  rows = load_results(folder)
  if not rows:
    raise SystemExit(f"no finished runs under {folder}")
  summary = summarize(rows)
  files.save_json(os.path.join(folder, "summary.json"), {"rows": summary})
  with files.atomic_write(os.path.join(folder, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(markdown(summary))
  with files.atomic_write(os.path.join(folder, "headline.md")) as tmp, open(tmp, "w") as f:
    f.write(headline(summary))
  print(markdown(summary))
  # Figure 2: quality against time, one line per family over depths (base variant).
  for variant in sorted({s["variant"] for s in summary}):
    for sampler in sorted({s["sampler"] for s in summary if s["variant"] == variant}):
      chosen = [s for s in summary if s["variant"] == variant and s["sampler"] == sampler]
      series = {}
      for family in COLOURS:
        points = sorted((s["depth"], 1e3 * s["seconds_per_image"], s["frechet_distance"])
                        for s in chosen if s["family"] == family)
        if points:
          series[family] = ([p[1] for p in points], [p[2] for p in points],
                            COLOURS[family], [f"D{p[0]}" for p in points])
      if len(series) < 2:  # figure 2 compares families
        continue
      line_plot(series, "ms per image (sampling)", "Frechet distance").save(
          os.path.join(folder, f"quality_vs_time_{variant}_{file_name(sampler)}.png"))
  # Learning curves, per variant and depth: mean train/fid_proxy over seeds against the step
  # (drawn during training with the run's own sampler, named in the legend).
  for variant, depth in sorted({(r["variant"], r["depth"]) for r in rows}):
    series = {}
    for family in COLOURS:
      runs = {}
      for r in rows:  # the curve is the run's, whatever sampler its result is for
        if (r["family"], r["depth"], r["variant"]) == (family, depth, variant) and r["curve"]:
          runs[r["seed"]] = r
      if runs:
        first = next(iter(runs.values()))
        steps = [p[0] for p in first["curve"]]
        mean = np.mean([[p[1] for p in r["curve"]] for r in runs.values()
                        if len(r["curve"]) == len(steps)], axis=0)
        label = first.get("curve_sampler", sampler_label({"steps": 8}, family))
        series[f"{family} ({label}, {len(runs)} seeds)"] = (steps, list(mean),
                                                            COLOURS[family])
    if series:
      line_plot(series, "generator step", f"fid_proxy (D{depth})").save(
          os.path.join(folder, f"curves_{variant}_d{depth}.png"))
  print(f"wrote {folder}/table.md, summary.json and plots")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("run", "report", "pack"))
  parser.add_argument("--data", default="digits")
  parser.add_argument("--workdir", default="/tmp/resgen_study")
  parser.add_argument("--families", default=",".join(compare.FAMILIES))
  parser.add_argument("--depths", default="4,8,16")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--train_steps", type=int, default=1000)
  parser.add_argument("--samples", type=int, default=2000)
  parser.add_argument("--sampler_batch", type=int, default=500)
  parser.add_argument("--variant", default="base")
  parser.add_argument("--set", action="append", default=[],
                      help="dotted.config.field=value (the variant's overrides)")
  parser.add_argument("--sampler", action="append", default=[],
                      help="name:field=value,... over config.sampler (default: the config's)")
  parser.add_argument("--out", default=OUT)
  args = parser.parse_args()
  args.families = [f for f in args.families.split(",") if f]
  args.depths = [int(d) for d in args.depths.split(",")]
  args.seeds = [int(s) for s in args.seeds.split(",")]
  unknown = [f for f in args.families if f not in compare.FAMILIES]
  if unknown:
    parser.error(f"unknown families {unknown}; known: {compare.FAMILIES}")
  if any(not 1 <= d <= MAX_DEPTH for d in args.depths):
    parser.error(f"--depths must lie in [1, {MAX_DEPTH}]")
  if args.variant == "base" and args.set:
    parser.error("--set changes the config: name the variant (--variant NAME)")
  if args.samples < 2 * 10 or args.train_steps < 1:
    parser.error("--samples must be >= 20 and --train_steps >= 1")
  if args.command == "pack":
    pack_base(os.path.join(args.workdir, args.data),
              os.path.join(args.out, args.data, BASE_ARCHIVE))
    return
  (run_study if args.command == "run" else report)(args)


if __name__ == "__main__":
  main()
