"""Tests of resgen_jax.evaluation: Frechet distance math and the digits classifier."""

import json

import jax
import numpy as np
import pytest
import scipy.linalg
from flax import serialization

from resgen_jax import config_base
from resgen_jax import data as data_lib
from resgen_jax.evaluation import classifier
from resgen_jax.evaluation import frechet

NUM_CLASSES = 10
MIN_ACCURACY = 0.95  # what the default training must reach on the 297 held-out digits
CHANCE_BOUND = 0.3  # agreement with shuffled labels must be near chance (0.1 for 10 classes)


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
  """A random well-conditioned SPD ``[dim, dim]``."""
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def reference_distance(mu1, sigma1, mu2, sigma2) -> float:
  """FD as the standard FID tools compute it: ``tr(scipy.linalg.sqrtm(s1 @ s2))``."""
  trace_root = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_root)


def low_rank_distance(features1, features2) -> float:
  """FD of two feature sets ``[n, F]`` with n < F from their centred features ``a``, ``b``:
  ``s1 s2 = a^T (a b^T) b / ((n1 - 1)(n2 - 1))`` has the non-zero eigenvalues of
  ``(a b^T)(b a^T) / ...``, so ``tr sqrtm(s1 s2)`` is the nuclear norm of ``a b^T`` over
  ``sqrt((n1 - 1)(n2 - 1))``: exact, with no F x F square root."""
  a, b = features1 - features1.mean(0), features2 - features2.mean(0)
  norm = np.sqrt((len(a) - 1) * (len(b) - 1))
  trace_root = np.sum(np.linalg.svd(a @ b.T, compute_uv=False)) / norm
  return float(np.sum((features1.mean(0) - features2.mean(0)) ** 2)
               + np.sum(a * a) / (len(a) - 1) + np.sum(b * b) / (len(b) - 1) - 2 * trace_root)


# --- frechet ------------------------------------------------------------------------------


def test_gaussian_stats_matches_numpy():
  features = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
  mu, sigma = frechet.gaussian_stats(features)
  assert mu.dtype == np.float64 and sigma.shape == (5, 5)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64).T), rtol=1e-12)


@pytest.mark.parametrize("shape", [(1, 4), (0, 4), (5,)])
def test_gaussian_stats_rejects_too_few_or_bad_shape(shape):
  with pytest.raises(ValueError):
    frechet.gaussian_stats(np.zeros(shape))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_independent_reference(seed):
  rng = np.random.default_rng(seed)
  dim = 12
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)
  got = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(got, reference_distance(mu1, sigma1, mu2, sigma2), rtol=1e-8)


def test_frechet_of_a_set_with_itself_is_zero():
  features = np.random.default_rng(3).normal(size=(200, 16)) * 5.0 + 2.0
  mu, sigma = frechet.gaussian_stats(features)
  assert frechet.frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)


def test_frechet_diagonal_closed_form():
  rng = np.random.default_rng(4)
  a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_rank_deficient_covariances_are_exact():
  rng = np.random.default_rng(5)
  features1, features2 = rng.normal(size=(8, 64)), rng.normal(size=(10, 64)) + 0.5
  stats1, stats2 = frechet.gaussian_stats(features1), frechet.gaussian_stats(features2)
  got = frechet.frechet_distance(*stats1, *stats2)
  np.testing.assert_allclose(got, low_rank_distance(features1, features2), rtol=1e-10)
  assert 0.0 <= frechet.frechet_distance(*stats1, *stats1) < 1e-6 * np.trace(stats1[1])


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("fault, message", [
    (lambda s: -s, "sigma[12] is not positive semi-definite"),
    (lambda s: s + np.triu(np.ones_like(s), 1), "sigma[12] is not symmetric"),
    (lambda s: np.where(np.eye(len(s)) > 0, np.nan, s), "sigma[12] has non-finite entries"),
])
def test_frechet_rejects_inputs_that_are_not_covariances(which, fault, message):
  rng = np.random.default_rng(6)
  sigmas = [random_covariance(rng, 4), random_covariance(rng, 4)]
  sigmas[which] = fault(sigmas[which])
  with pytest.raises(ValueError, match=message.replace("[12]", str(which + 1))):
    frechet.frechet_distance(np.zeros(4), sigmas[0], np.zeros(4), sigmas[1])


@pytest.mark.parametrize("shapes", [((3,), (3, 3), (4,), (4, 4)),
                                    ((3,), (3, 3), (3,), (4, 4)),
                                    ((3,), (3, 4), (3,), (3, 4))])
def test_frechet_shape_mismatch_names_shapes(shapes):
  arrays = [np.zeros(s) for s in shapes]
  with pytest.raises(ValueError, match=r"sigma1 \(3, \d\)"):
    frechet.frechet_distance(*arrays)


def test_streaming_stats_match_concatenation():
  rng = np.random.default_rng(7)
  batches = [rng.normal(size=(n, 6)) * 3.0 + 1.0 for n in (5, 0, 1, 17, 9)]
  stream = frechet.StreamingStats()
  for batch in batches:
    stream.update(batch.astype(np.float32))
  mu, sigma = stream.stats()
  want_mu, want_sigma = frechet.gaussian_stats(np.concatenate(batches).astype(np.float32))
  assert stream.count == 32
  np.testing.assert_allclose(mu, want_mu, rtol=1e-10)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-12)


def test_streaming_stats_errors():
  stream = frechet.StreamingStats()
  stream.update(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    stream.stats()
  with pytest.raises(ValueError, match="4 dimensions"):
    stream.update(np.zeros((2, 4)))


# --- classifier ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  config = config_base.base_config().data
  return data_lib.load_all(config, "train"), data_lib.load_all(config, "test")


@pytest.fixture(scope="module")
def trained(digits):
  (train_images, train_labels), _ = digits
  return classifier.train_classifier(train_images, train_labels, NUM_CLASSES)


@pytest.fixture(scope="module")
def evaluator(trained, digits):
  (train_images, _), (test_images, test_labels) = digits
  return classifier.ClassifierEvaluator(trained, NUM_CLASSES, test_images, test_labels,
                                        baseline_images=train_images)


def accuracy(params, images, labels) -> float:
  logits, _ = classifier.predict(params, NUM_CLASSES, images)
  return float(np.mean(logits.argmax(-1) == labels))


def test_classifier_shapes():
  images = np.zeros((3, 16, 16, 1), np.uint8)
  model = classifier.Classifier(num_classes=7)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  logits, features = model.apply({"params": params}, images)
  assert logits.shape == (3, 7) and features.shape == (3, classifier.FEATURE_DIM)


def test_default_training_reaches_accuracy(trained, digits):
  _, (test_images, test_labels) = digits
  assert accuracy(trained, test_images, test_labels) >= MIN_ACCURACY


def test_training_is_deterministic(digits):
  (images, labels), _ = digits
  run = lambda seed: classifier.train_classifier(images, labels, NUM_CLASSES, num_steps=3,
                                                 seed=seed)
  first, second, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first["logits"]["kernel"], second["logits"]["kernel"])
  assert not np.array_equal(first["logits"]["kernel"], other["logits"]["kernel"])


def test_training_rejects_bad_labels(digits):
  (images, labels), _ = digits
  with pytest.raises(ValueError, match=r"\[0, 5\)"):
    classifier.train_classifier(images, labels, 5, num_steps=1)


def test_predict_batches_agree(trained, digits):
  _, (test_images, _) = digits
  logits, features = classifier.predict(trained, NUM_CLASSES, test_images)
  small_logits, small_features = classifier.predict(trained, NUM_CLASSES, test_images,
                                                    batch_size=100)
  assert logits.shape == (297, NUM_CLASSES) and features.shape == (297, classifier.FEATURE_DIM)
  np.testing.assert_allclose(small_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(small_features, features, rtol=1e-5, atol=1e-5)


def test_evaluator_on_held_out_set(evaluator, trained, digits):
  _, (test_images, test_labels) = digits
  scores = evaluator.evaluate(test_images, test_labels)
  assert scores["class_agreement"] == accuracy(trained, test_images, test_labels)
  assert 0.0 <= scores["frechet_distance"] < 1e-6
  assert scores["precision"] == scores["recall"] == 1.0  # the reference set itself
  reference = evaluator.reference()
  assert reference["class_agreement"] == scores["class_agreement"]
  assert reference["frechet_distance"] > 0.0
  assert 0.5 < reference["precision"] <= 1.0 and 0.5 < reference["recall"] <= 1.0


def test_evaluator_wrong_labels_drop_to_chance(evaluator, digits):
  _, (test_images, test_labels) = digits
  shuffled = np.random.default_rng(0).permutation(test_labels)
  assert evaluator.evaluate(test_images, shuffled)["class_agreement"] < CHANCE_BOUND


def test_evaluator_noise_is_far_from_real(evaluator, digits):
  _, (test_images, test_labels) = digits
  noise = np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8)
  real_vs_real = evaluator.reference()["frechet_distance"]
  scores = evaluator.evaluate(noise, test_labels)
  assert scores["frechet_distance"] > 10.0 * real_vs_real
  # Noise lies mostly off the real manifold (real vs real: about 0.9).
  assert scores["precision"] < 0.2 * evaluator.reference()["precision"]


def test_evaluator_without_baseline_uses_halves(trained, digits):
  _, (test_images, test_labels) = digits
  halves = classifier.ClassifierEvaluator(trained, NUM_CLASSES, test_images, test_labels)
  distance = halves.reference()["frechet_distance"]
  assert np.isfinite(distance) and distance > 0.0


def test_evaluator_validates_inputs(evaluator, trained, digits):
  _, (test_images, test_labels) = digits
  with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
    evaluator.evaluate(test_images[:, :8, :8], test_labels)
  with pytest.raises(ValueError, match="uint8"):
    evaluator.evaluate(test_images.astype(np.float32), test_labels)
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    evaluator.evaluate(test_images, test_labels + 1)
  with pytest.raises(ValueError, match=r"\[297\]"):
    evaluator.evaluate(test_images, test_labels[:5])
  with pytest.raises(ValueError, match="channels"):
    classifier.ClassifierEvaluator(trained, NUM_CLASSES, np.repeat(test_images, 3, -1),
                                   test_labels)


def test_save_load_round_trip(trained, digits, tmp_path):
  _, (test_images, _) = digits
  path = str(tmp_path / "classifier.msgpack")
  classifier.save_classifier(path, trained, NUM_CLASSES, test_images.shape[1:])
  params, meta = classifier.load_classifier(path)
  assert meta["num_classes"] == NUM_CLASSES and meta["image_shape"] == (16, 16, 1)
  for before, after in zip(classifier.predict(trained, NUM_CLASSES, test_images),
                           classifier.predict(params, NUM_CLASSES, test_images)):
    np.testing.assert_array_equal(before, after)


def test_load_errors_name_the_path(trained, tmp_path):
  missing = str(tmp_path / "missing.msgpack")
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    classifier.load_classifier(missing)
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(b"not a classifier")
  with pytest.raises(ValueError, match="corrupt.msgpack"):
    classifier.load_classifier(str(corrupt))
  truncated = tmp_path / "truncated.msgpack"
  classifier.save_classifier(str(truncated), trained, NUM_CLASSES, (16, 16, 1))
  truncated.write_bytes(truncated.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated.msgpack"):
    classifier.load_classifier(str(truncated))
  mismatched = tmp_path / "mismatched.msgpack"
  classifier.save_classifier(str(mismatched), trained, NUM_CLASSES + 1, (16, 16, 1))
  with pytest.raises(ValueError, match="mismatched.msgpack.*do not fit"):
    classifier.load_classifier(str(mismatched))


def test_get_or_train_classifier(trained, tmp_path, monkeypatch):
  config = config_base.base_config().data
  path = str(tmp_path / "new.msgpack")
  params = classifier.get_or_train_classifier(path, config, NUM_CLASSES, num_steps=2)
  _, meta = classifier.load_classifier(path)
  assert meta["image_shape"] == (16, 16, 1)
  saved = str(tmp_path / "saved.msgpack")
  classifier.save_classifier(saved, trained, NUM_CLASSES, (16, 16, 1))

  def no_training(*args, **kwargs):
    raise AssertionError("an existing classifier file must be loaded, not retrained")

  monkeypatch.setattr(classifier, "train_classifier", no_training)
  loaded = classifier.get_or_train_classifier(saved, config, NUM_CLASSES)
  np.testing.assert_array_equal(loaded["logits"]["kernel"], trained["logits"]["kernel"])
  assert set(params) == set(loaded)
  config.image_size = 32
  with pytest.raises(ValueError, match="saved.msgpack.*remove"):
    classifier.get_or_train_classifier(saved, config, NUM_CLASSES)


def test_flatten_pool_keeps_positions(digits, tmp_path):
  (images, labels), (test_images, _) = digits
  params = classifier.train_classifier(images, labels, NUM_CLASSES, num_steps=3, pool="flatten")
  # 16x16 ends at 4x4x64 before the features layer: flatten feeds all 1024 values.
  assert params["features"]["kernel"].shape == (4 * 4 * classifier.CONV_WIDTHS[-1],
                                                classifier.FEATURE_DIM)
  logits, features = classifier.predict(params, NUM_CLASSES, test_images[:5], pool="flatten")
  want_logits, want_features = classifier.Classifier(NUM_CLASSES, "flatten").apply(
      {"params": params}, test_images[:5])
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features, want_features, rtol=1e-5, atol=1e-5)
  path = str(tmp_path / "flatten.msgpack")
  classifier.save_classifier(path, params, NUM_CLASSES, (16, 16, 1), pool="flatten")
  assert classifier.load_classifier(path)[1]["pool"] == "flatten"
  config = config_base.base_config().data
  with pytest.raises(ValueError, match="flatten.msgpack.*pool='flatten'.*pool='mean'"):
    classifier.get_or_train_classifier(path, config, NUM_CLASSES, pool="mean")
  with pytest.raises(ValueError, match="pool must be one of"):
    classifier.train_classifier(images, labels, NUM_CLASSES, num_steps=1, pool="max")


def test_version_1_files_read_as_mean_pool(trained, digits, tmp_path):
  """Classifiers saved before ``pool`` existed keep loading (and scoring) as they were."""
  _, (test_images, _) = digits
  meta = dict(format=classifier.FILE_FORMAT, version=1, num_classes=NUM_CLASSES,
              image_shape=[16, 16, 1], feature_dim=classifier.FEATURE_DIM)
  path = tmp_path / "v1.msgpack"
  path.write_bytes(serialization.to_bytes({"meta": json.dumps(meta),
                                           "params": jax.device_get(trained)}))
  params, loaded = classifier.load_classifier(str(path))
  assert loaded["pool"] == "mean"
  np.testing.assert_array_equal(classifier.predict(params, NUM_CLASSES, test_images[:8])[0],
                                classifier.predict(trained, NUM_CLASSES, test_images[:8])[0])
