"""A small ImageNet-shaped data set, made here: the ImageNet path without ImageNet.

    python -m resgen_jax.data.fake_imagenet [--out=DIR] [--classes=10] [--train_per_class=24]
    python -m resgen_jax.main --config=configs/imagenet.py:runlocal --workdir=/tmp/imagenet_local

Writes, under ``--out`` (default :data:`DEFAULT_ROOT`, where ``configs/imagenet.py:runlocal``
looks):

* ``train/<wnid>/<wnid>_<i>.JPEG`` and ``validation/<wnid>/ILSVRC2012_val_<i>.JPEG``: JPEGs
  of mixed sizes and aspect ratios (as ImageNet's are; a few greyscale, as ImageNet has),
  one synset-like folder per class, for the ``folder`` source, which decodes, resizes the
  short side and centre-crops to ``data.image_size`` like the TFDS path does. Each class is
  a colour and a shape on a textured background, so a generator has something to learn.
* ``lpips_random.npz`` and ``inception_random.npz``: the LPIPS and FID-Inception weight
  files in the exact layouts the real converters write (``codec/losses.py``,
  ``evaluation/inception.py``), with *random* values: they run the perceptual loss and the
  FID evaluator's code paths; their numbers mean nothing. Real runs give the converted
  files instead.

With ``--tfds_dir=DATA_DIR`` it also prepares the same images as the TFDS ``imagenet2012``
data set (:func:`make_tfds`): it writes ``ILSVRC2012_img_train.tar`` (one tar per synset)
and ``ILSVRC2012_img_val.tar`` in the real layouts into ``<out>/tfds_manual`` and runs
TFDS's own ImageNet builder on them, so ``--config.data.name=imagenet2012
--config.data.data_dir=DATA_DIR`` streams them through the path a pod uses. Training class
``k`` is TFDS's ``k``-th synset; TFDS labels validation files from its own table by their
rank in name order, so the held-out labels are that table's first entries (anywhere in
0..999: such a run needs ``data.num_classes=1000``; :func:`tfds_validation_labels`).

Deterministic for a seed; an existing complete set of the same settings is kept.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile

import jax
import numpy as np
from flax import traverse_util
from PIL import Image, ImageDraw

from resgen_jax.codec import losses
from resgen_jax.evaluation import inception
from resgen_jax.utils import files

DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "resgen_fake_imagenet")
LPIPS_FILE, INCEPTION_FILE = "lpips_random.npz", "inception_random.npz"
DONE_FILE = "settings.json"  # written last: the settings of a complete set
SIDE_RANGE = (160, 400)  # pixels per side, drawn independently: mixed sizes and aspects
GREYSCALE_EVERY = 7  # every 7th image is single-channel, as a few ImageNet JPEGs are
JPEG_QUALITY = 90
SHAPES = ("ellipse", "rectangle", "triangle")


def synset(label: int) -> str:
  """An ImageNet-style folder name for class ``label`` (sorted order = label order)."""
  return f"n{label:08d}"


def draw_image(rng: np.random.Generator, label: int, num_classes: int) -> Image.Image:
  """Class ``label``: its hue and shape on a noisy background, at a random size."""
  width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
  base = rng.integers(40, 120, 3)
  pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  hue = np.array([np.cos(2 * np.pi * (label / num_classes + k / 3)) for k in range(3)])
  colour = tuple(int(v) for v in np.clip(150 + 100 * hue + rng.normal(0, 10, 3), 0, 255))
  side = min(width, height)
  size = side * rng.uniform(0.35, 0.6)
  cx, cy = width / 2 + rng.uniform(-0.15, 0.15) * side, height / 2 + rng.uniform(-0.15, 0.15) * side
  box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
  draw, shape = ImageDraw.Draw(image), SHAPES[label % len(SHAPES)]
  if shape == "ellipse":
    draw.ellipse(box, fill=colour)
  elif shape == "rectangle":
    draw.rectangle(box, fill=colour)
  else:
    draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
  return image


def write_split(root: str, split: str, per_class: int, num_classes: int, seed: int) -> None:
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  for label in range(num_classes):
    folder = os.path.join(root, split, synset(label))
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      image = draw_image(rng, label, num_classes)
      index = label * per_class + i
      if index % GREYSCALE_EVERY == GREYSCALE_EVERY - 1:
        image = image.convert("L")
      name = (f"{synset(label)}_{i}.JPEG" if split == "train"
              else f"ILSVRC2012_val_{index + 1:08d}.JPEG")
      path = os.path.join(folder, name)
      with files.atomic_write(path) as tmp:
        image.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def write_random_weights(root: str, seed: int) -> None:
  """The LPIPS and Inception weight files, random values in the converters' layouts."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in losses.lpips_param_shapes().items():
    value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)  # He init
    flat[name] = np.abs(value) if name.startswith("lin/") else value  # lin heads are >= 0
  losses.save_lpips_params(traverse_util.unflatten_dict(flat, sep=losses.KEY_SEPARATOR),
                           os.path.join(root, LPIPS_FILE))
  inception.save_params(os.path.join(root, INCEPTION_FILE), jax.tree_util.tree_map_with_path(
      lambda path, leaf: random_variable(rng, path[-1].key, leaf.shape),
      inception.abstract_variables()))


def random_variable(rng: np.random.Generator, name: str, shape) -> np.ndarray:
  """A variable of a network in inference mode: He-normal kernels, unit batch-norm scales
  and variances, zero biases and means (features neither vanish nor blow up)."""
  if name == "kernel":
    return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
  return np.ones(shape) if name in ("scale", "var") else np.zeros(shape)


def make(root: str = DEFAULT_ROOT, num_classes: int = 10, train_per_class: int = 24,
         eval_per_class: int = 6, seed: int = 0) -> str:
  """Writes the data set and weight files under ``root`` (kept when complete). -> root."""
  for name, value in (("classes", num_classes), ("train_per_class", train_per_class),
                      ("eval_per_class", eval_per_class)):
    if value < 1:
      raise ValueError(f"--{name} must be >= 1, got {value}")
  settings = {"classes": num_classes, "train_per_class": train_per_class,
              "eval_per_class": eval_per_class, "seed": seed}
  done = os.path.join(root, DONE_FILE)
  if os.path.exists(done):
    with open(done) as f:
      saved = json.load(f)
    if saved == settings:
      return root
    raise ValueError(f"{root} holds a fake ImageNet made with {saved}, not {settings}; "
                     f"give another --out or remove it")
  write_split(root, "train", train_per_class, num_classes, seed)
  write_split(root, "validation", eval_per_class, num_classes, seed)
  write_random_weights(root, seed)
  files.save_json(done, settings)
  return root


def tfds_validation_labels(count: int) -> np.ndarray:
  """The labels TFDS gives the first ``count`` validation files of :func:`make_tfds`."""
  labels, validation = tfds_synsets()
  return np.asarray([labels.index(name) for name in validation[:count]], np.int32)


def tfds_synsets() -> list:
  """TFDS's 1000 ImageNet synsets in label order, and the synset of each validation file in
  name order, from the files TFDS ships."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  folder = tfds.core.tfds_path("datasets/imagenet2012")
  read = lambda name: (folder / name).read_text().split()
  return read("labels.txt"), read("validation_labels.txt")


def tar_bytes(members) -> bytes:
  """An uncompressed tar of ``(name, bytes)`` members."""
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as tar:
    for name, blob in members:
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return out.getvalue()


def class_files(root: str, split: str, label: int) -> list:
  folder = os.path.join(root, split, synset(label))
  return [os.path.join(folder, name) for name in sorted(os.listdir(folder))]


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def make_tfds(root: str, data_dir: str) -> str:
  """Prepares the fake set under ``root`` (:func:`make`) as TFDS ``imagenet2012`` in
  ``data_dir`` (kept when already prepared). -> data_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from resgen_jax.data import sources  # pylint: disable=g-import-not-at-top
  sources.import_tensorflow()
  with open(os.path.join(root, DONE_FILE)) as f:
    num_classes = json.load(f)["classes"]
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if builder.is_prepared():
    return data_dir
  labels, validation = tfds_synsets()
  if num_classes > len(labels):
    raise ValueError(f"TFDS ImageNet has {len(labels)} classes, the fake set {num_classes}")
  manual = os.path.join(root, "tfds_manual")
  os.makedirs(manual, exist_ok=True)
  class_tars = [(f"{labels[label]}.tar", tar_bytes(
      (os.path.basename(p).replace(synset(label), labels[label]), read_bytes(p))
      for p in class_files(root, "train", label))) for label in range(num_classes)]
  files.save_bytes(os.path.join(manual, "ILSVRC2012_img_train.tar"), tar_bytes(class_tars))
  # TFDS labels validation files by their rank in name order (the k-th gets entry k of its
  # table), so these get the first len(val) entries, not the folder's classes.
  paths = [p for label in range(num_classes) for p in class_files(root, "validation", label)]
  val = [(f"ILSVRC2012_val_{k + 1:08d}.JPEG", read_bytes(p)) for k, p in enumerate(paths)]
  files.save_bytes(os.path.join(manual, "ILSVRC2012_img_val.tar"), tar_bytes(val))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return data_dir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=DEFAULT_ROOT)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--train_per_class", type=int, default=24)
  parser.add_argument("--eval_per_class", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tfds_dir", default="",
                      help="also prepare it as TFDS imagenet2012 in this data_dir")
  args = parser.parse_args()
  root = make(args.out, args.classes, args.train_per_class, args.eval_per_class, args.seed)
  print(f"wrote a fake ImageNet ({args.classes} classes) under {root}")
  if args.tfds_dir:
    make_tfds(root, args.tfds_dir)
    print(f"prepared it as TFDS imagenet2012 in {args.tfds_dir} (--config.data.name="
          f"imagenet2012 --config.data.data_dir={args.tfds_dir})")


if __name__ == "__main__":
  main()
