"""``configs/imagenet.py:runlocal``: the ImageNet config's every stage, from the command line,
on the small ImageNet-shaped set that ``resgen_jax.data.fake_imagenet`` makes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CHILD_JAX_ENV, execute_notebook, flatten, images_shown, set_fields
from resgen_jax import config_base, stages
from resgen_jax import data as data_lib
from resgen_jax.codec import losses, token_cache
from resgen_jax.data import fake_imagenet
from resgen_jax.evaluation import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "imagenet.py")
CLASSES, TRAIN_PER_CLASS, EVAL_PER_CLASS = 10, 3, 1  # 30 train, 10 held-out (> k = 3)
TEST_IMAGE_SIZE = 64  # the test's one shrink beyond runlocal's: 256 -> 64 (a 2 x 2 grid)
# What runlocal may change: sizes, step counts and intervals, and where its data lives.
SIZE_FIELDS = (
    "data.name", "data.path", "data.eval_path", "data.num_classes",
    "tokenizer.model.channels", "tokenizer.model.num_res_blocks",
    "tokenizer.model.latent_dim", "tokenizer.model.norm_groups",
    "tokenizer.quantizer.codebook_size", "tokenizer.loss.perceptual_weights",
    "tokenizer.loss.gan_start_step", "tokenizer.train", "tokenizer.encode_chunk_batches",
    "generator.model.width", "generator.model.num_layers", "generator.model.num_heads",
    "generator.model.low_rank", "generator.model.dropout", "generator.train",
    "sampler.steps", "sampler.samples_per_class", "sampler.batch_size",
    "evaluation.inception_weights", "evaluation.batch_size",
    "evaluation.tokenizer_rfid_examples", "evaluation.proxy_every", "evaluation.proxy_samples",
    "evaluation.proxy_reference_examples")


def test_runlocal_differs_from_the_paper_config_only_in_sizes():
  full = flatten(config_base.load_config_file(CONFIG).to_dict())
  local = flatten(config_base.load_config_file(CONFIG + ":runlocal").to_dict())
  changed = {k for k in full if full[k] != local[k]}
  assert full.keys() == local.keys()
  assert all(any(k == f or k.startswith(f + ".") for f in SIZE_FIELDS) for k in changed), \
      sorted(changed)
  # The architecture and the schedule's switches are the paper's.
  assert local["tokenizer.model.mid_attention"] and local["tokenizer.quantizer.shared_codebook"]
  assert local["tokenizer.quantizer.depth"] == 16 and local["tokenizer.loss.gan_weight"] > 0
  assert local["tokenizer.train.num_steps"] > local["tokenizer.loss.gan_start_step"] > 0
  assert local["sampler.cfg_scale"] > 1 and local["evaluation.extractor"] == "inception"
  assert local["stages"] == ("tokenizer", "encode", "generator", "sample", "evaluate")


def test_an_unknown_variant_is_refused():
  with pytest.raises(ValueError, match=r"variants \('', 'runlocal'\), got 'tiny'"):
    config_base.load_config_file(CONFIG + ":tiny")


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  return fake_imagenet.make(str(tmp_path_factory.mktemp("fake_imagenet")), CLASSES,
                            TRAIN_PER_CLASS, EVAL_PER_CLASS)


def test_the_fake_imagenet_is_mixed_jpegs_in_the_real_layouts(fake):
  paths = sorted(os.path.join(d, f) for d, _, names in os.walk(os.path.join(fake, "train"))
                 for f in names)
  assert len(paths) == CLASSES * TRAIN_PER_CLASS
  images = [Image.open(p) for p in paths]
  assert {i.format for i in images} == {"JPEG"}
  assert len({i.size for i in images}) > len(images) // 2  # mixed sizes and aspects
  assert {i.mode for i in images} == {"RGB", "L"}  # a few greyscale, as in ImageNet
  config = config_base.load_config_file(CONFIG + ":runlocal")
  config.data.update(path=os.path.join(fake, "train"), eval_path=os.path.join(fake,
                                                                               "validation"))
  source = data_lib.load_source(config.data, "validation")
  batch, labels = source.get(np.arange(source.num_examples))
  assert batch.shape == (CLASSES * EVAL_PER_CLASS, 256, 256, 3)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(CLASSES), EVAL_PER_CLASS))
  # The weight files are read by the real loaders (names, shapes, non-negative lin heads).
  lpips = losses.load_lpips_params(os.path.join(fake, fake_imagenet.LPIPS_FILE))
  assert lpips["vgg"]["conv12"]["kernel"].shape == (3, 3, 512, 512)
  assert "batch_stats" in inception.load_params(os.path.join(fake, fake_imagenet.INCEPTION_FILE))
  # A complete set is kept; one of other settings is refused, not mixed in.
  stamp = os.stat(paths[0]).st_mtime_ns
  fake_imagenet.make(fake, CLASSES, TRAIN_PER_CLASS, EVAL_PER_CLASS)
  assert os.stat(paths[0]).st_mtime_ns == stamp
  with pytest.raises(ValueError, match="made with"):
    fake_imagenet.make(fake, CLASSES + 1, TRAIN_PER_CLASS, EVAL_PER_CLASS)


def test_the_fake_imagenet_as_tfds_streams_through_the_pods_path(fake, tmp_path):
  """``fake_imagenet.make_tfds``: TFDS's own imagenet2012 builder prepares the fake JPEGs
  from tars in the real layouts; the stream source reads every held-out image with the
  label TFDS gives it (the folder source's image, up to TF's resize against PIL's), and
  trains from the synset classes."""
  data_dir = fake_imagenet.make_tfds(fake, str(tmp_path / "tfds"))
  config = config_base.load_config_file(CONFIG + ":runlocal").data
  config.update(name="imagenet2012", data_dir=data_dir, image_size=TEST_IMAGE_SIZE,
                eval_split="validation", num_classes=1000)
  streamed = list(data_lib.eval_batches(config, "validation", 4))
  images = np.concatenate([b["image"][b["valid"]] for b in streamed])
  labels = np.concatenate([b["label"][b["valid"]] for b in streamed])
  want_labels = fake_imagenet.tfds_validation_labels(CLASSES * EVAL_PER_CLASS)
  assert len(set(want_labels)) == len(want_labels)  # each label names one file here
  assert sorted(labels) == sorted(want_labels)
  folder = config_base.load_config_file(CONFIG + ":runlocal").data
  folder.update(path=os.path.join(fake, "train"), eval_path=os.path.join(fake, "validation"),
                image_size=TEST_IMAGE_SIZE)
  expected, _ = data_lib.load_all(folder, "validation")  # in file order, as tarred
  for image, label in zip(images, labels):
    reference = expected[list(want_labels).index(label)].astype(np.float64)
    assert np.mean(np.abs(image - reference)) < 3.0, label  # the same picture
  batch = next(data_lib.make_train_iterator(config, 8, seed=0))
  assert batch["image"].shape == (8, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)
  assert batch["image"].dtype == np.uint8 and set(batch["label"]) <= set(range(CLASSES))
  assert fake_imagenet.make_tfds(fake, data_dir) == data_dir  # prepared: kept


# The CLI run's settings beyond runlocal's (and the fake set's paths: cli_overrides).
OVERRIDES = {"data.image_size": TEST_IMAGE_SIZE,
             # 16 Frechet distances in 2048-d Inception features (~10 s each on 2 cores);
             # the report's rFID path is the digits tests' (and runlocal's own run's)
             "evaluation.tokenizer_rfid": False,
             # CI's budget: fewer steps (the GAN still switches on mid-run), one
             # evaluation per stage, one Inception batch shape
             "tokenizer.train.num_steps": 4, "tokenizer.loss.gan_start_step": 2,
             "tokenizer.train.log_every": 1, "tokenizer.train.eval_every": 0,
             "tokenizer.train.checkpoint_every": 2, "generator.train.num_steps": 6,
             "generator.train.log_every": 3, "generator.train.eval_every": 0,
             "generator.train.checkpoint_every": 3, "evaluation.batch_size": 10,
             "evaluation.proxy_every": 6}  # one Inception FID proxy, at the last step


def cli_overrides(fake):
  """OVERRIDES with the fake set's paths filled in."""
  paths = {"data.path": os.path.join(fake, "train"),
           "data.eval_path": os.path.join(fake, "validation"),
           "tokenizer.loss.perceptual_weights": os.path.join(fake, fake_imagenet.LPIPS_FILE),
           "evaluation.inception_weights": os.path.join(fake, fake_imagenet.INCEPTION_FILE)}
  return dict(OVERRIDES, **paths)


@pytest.fixture(scope="module")
def local_run(fake, tmp_path_factory):
  """``python -m resgen_jax.main --config=configs/imagenet.py:runlocal`` run once: its
  workdir, once every stage has finished (or the CLI's error)."""
  workdir = str(tmp_path_factory.mktemp("imagenet_local") / "run")
  command = [sys.executable, "-m", "resgen_jax.main", f"--config={CONFIG}:runlocal",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in cli_overrides(fake).items()]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, **CHILD_JAX_ENV))
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_runlocal_runs_every_stage_from_the_command_line(fake, local_run):
  workdir = local_run
  with open(os.path.join(workdir, "tokenizer", stages.tokenizer.RESULTS_FILE)) as f:
    report = json.load(f)
  assert len(report["psnr_by_depth"]) == 16 and len(report["usage_by_depth"]) == 16
  meta, books = token_cache.load_meta(workdir)
  assert meta["grid"] == [2, 2] and meta["depth"] == 16 and books.shape == (1, 256, 16)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  gan = [r["train/d_loss"] for r in rows if r.get("stage") == "tokenizer" and "train/d_loss" in r]
  assert gan and gan[0] == 0 and gan[-1] != 0  # the discriminator switches on inside the run
  proxy = [r["train/fid_proxy"] for r in rows if "train/fid_proxy" in r]
  assert len(proxy) == 1 and np.isfinite(proxy[0])  # Inception, on 8 held-out images
  samples = stages.sample.samples_path(
      set_fields(config_base.load_config_file(CONFIG + ":runlocal"), cli_overrides(fake)),
      workdir)
  with np.load(samples) as data:
    assert data["arr_0"].shape == (CLASSES * 4, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)
    assert data["arr_0"].dtype == np.uint8 and data["codes"].shape == (CLASSES * 4, 2, 2, 16)
  with open(os.path.splitext(samples)[0] + "_eval.json") as f:
    generated = json.load(f)["generated"]
  assert {"fid", "inception_score", "precision", "recall"} <= generated.keys()
  assert all(np.isfinite(v) for v in generated.values())


def test_the_imagenet_notebook_runs_on_the_local_run(fake, local_run):
  """notebooks/imagenet.ipynb after training: CFG samples, the reveal, and inpainting of
  user image files of mixed sizes, through the Python API at the run's 64x64."""
  files = sorted(os.path.join(fake, "validation", c, f)
                 for c in sorted(os.listdir(os.path.join(fake, "validation")))[:2]
                 for f in os.listdir(os.path.join(fake, "validation", c)))
  notebook = execute_notebook("imagenet.ipynb", dict(
      WORKDIR=local_run, TRAIN=False, CLASSES=(0, 3), SAMPLES_PER_CLASS=2,
      IMAGE_FILES=tuple(files)))
  assert images_shown(notebook) >= 4  # samples, the reveal rows and GIF, inpainting
  assert os.path.getsize(os.path.join(local_run, "reveal.gif")) > 0
  text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
  assert "tokens per image: (2, 2) x depth 16" in text and "'fid'" in text


def test_the_paper_config_refuses_to_start_without_its_inception_weights(tmp_path):
  """Its stages end with the Inception FID: without the weights file the run is refused at
  start-up, before a tokenizer trains for days, and nothing is written."""
  config = config_base.load_config_file(CONFIG)
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="needs evaluation.inception_weights"):
    stages.run(config, workdir)
  config.evaluation.inception_weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="evaluation.inception_weights: no file at"):
    stages.run(config, workdir)
  assert not os.path.exists(workdir)
