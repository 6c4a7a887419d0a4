"""FID / IS / precision-recall with the FID Inception, streamed, and --mode=evaluate with
extractor=inception on data, samples and weights made here."""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from resgen_jax import stages
from resgen_jax.evaluation import features as features_lib
from resgen_jax.evaluation import fid, inception
from resgen_jax.train import mesh as mesh_lib
from test_inception import random_variables

SIZE, COUNT = 32, 20


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rows_stream_in_batches(tmp_path, compressed):
  array = np.random.default_rng(0).integers(0, 256, (23, 4, 5, 3), dtype=np.uint8)
  path = str(tmp_path / "a.npz")
  (np.savez_compressed if compressed else np.savez)(path, arr_0=array, labels=np.arange(23))
  batches = list(fid.npz_member_batches(path, "arr_0", 10))
  assert [len(b) for b in batches] == [10, 10, 3]
  np.testing.assert_array_equal(np.concatenate(batches), array)
  with pytest.raises(KeyError, match="no array 'images'"):
    next(fid.npz_member_batches(path, "images", 10))


def test_reference_files_are_checked(tmp_path):
  path = str(tmp_path / "ref.npz")
  np.savez(path, mu=np.zeros(2048))
  with pytest.raises(ValueError, match="must hold 'mu'"):
    fid.load_reference(path)
  np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(ValueError, match=r"must be \[2048\]"):
    fid.load_reference(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A data set (npz source, RGB 32x32), FID Inception weights, and a config using them."""
  root = tmp_path_factory.mktemp("fid")
  rng = np.random.default_rng(0)
  # Smooth random images (upsampled noise): real-looking enough for distinct features.
  coarse = rng.integers(0, 256, (COUNT, 4, 4, 3)).astype(np.uint8)
  images = np.repeat(np.repeat(coarse, SIZE // 4, axis=1), SIZE // 4, axis=2)
  np.savez(root / "data.npz", images=images, labels=np.arange(COUNT) % 2)
  inception.save_params(str(root / "inception.npz"), random_variables())
  config = tiny_config()
  config.data.update(name="npz", path=str(root / "data.npz"), image_size=SIZE, num_classes=2)
  # One batch shape (20 = 2 x 10) for samples and data: the Inception compiles once.
  config.evaluation.update(extractor="inception", inception_weights=str(root / "inception.npz"),
                           batch_size=10)
  return root, config, images


def evaluate(config, root, images, name):
  config.sampler.tag = name
  path = stages.sample.samples_path(config, str(root))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, arr_0=images, labels=np.zeros(len(images), np.int32))
  return stages.evaluate.run(config, str(root), mesh_lib.make_mesh(("data",), (-1,)))


def test_evaluate_with_inception_scores_against_the_held_out_split(workdir):
  root, config, images = workdir
  same = evaluate(config, root, images, "same")
  noise = evaluate(config, root, np.random.default_rng(1).integers(
      0, 256, images.shape, dtype=np.uint8), "noise")
  assert same["evaluation"] == {"extractor": "inception",
                                "inception_weights": config.evaluation.inception_weights,
                                "reference_stats": ""}
  assert same["num_samples"] == COUNT
  scores, noisy = same["generated"], noise["generated"]
  assert scores["fid"] < 1e-6 * noisy["fid"]  # the reference set itself
  assert scores["precision"] == scores["recall"] == 1.0
  assert scores["inception_score"] == pytest.approx(
      same["real_heldout"]["inception_score"], rel=1e-6)
  with open(os.path.splitext(stages.sample.samples_path(config, str(root)))[0] + "_eval.json") as f:
    assert json.load(f)["generated"] == noisy


def test_reference_statistics_from_a_file_give_the_same_fid(workdir, tmp_path):
  root, config, images = workdir
  features, _ = features_lib.extract(fid.InceptionFeatures(config.evaluation.inception_weights),
                                     [images[:10], images[10:]])
  reference = features_lib.Reference.from_features(features)
  np.savez(tmp_path / "ref.npz", mu=reference.mu, sigma=reference.sigma,
           activations=reference.activations)
  from_data = evaluate(config, root, images[::-1], "reversed")["generated"]
  config.evaluation.reference_stats = str(tmp_path / "ref.npz")
  from_file = evaluate(config, root, images[::-1], "reversed_file")["generated"]
  assert from_file == pytest.approx(from_data, rel=1e-6, abs=1e-9)


def test_missing_weights_name_the_expected_file(workdir):
  root, config, images = workdir
  config = config.copy_and_resolve_references()
  config.evaluation.inception_weights = ""
  with pytest.raises(ValueError, match="needs evaluation.inception_weights.*6726825d"):
    evaluate(config, root, images, "no_weights")
  config.evaluation.inception_weights = str(root / "absent.npz")
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    evaluate(config, root, images, "absent_weights")
