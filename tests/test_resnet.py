"""The pretrained-CIFAR-ResNet extractor: its forward pass against a plain numpy ResNet on a
state-dict file made here (random values, the real names and shapes), and bad files."""

import numpy as np
import pytest

from resgen_jax.evaluation import resnet


def np_conv(x, w, stride):
  """x [B, H, W, Cin], w [out, in, 3, 3], padding 1: a loop over the 9 taps."""
  b, h, wd, _ = x.shape
  pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, wd, w.shape[0]))
  for i in range(3):
    for j in range(3):
      out += np.einsum("bhwc,oc->bhwo", pad[:, i:i + h, j:j + wd], w[:, :, i, j])
  return out[:, ::stride, ::stride]


def np_bn(x, p, name):
  return ((x - p[f"{name}.running_mean"]) / np.sqrt(p[f"{name}.running_var"] + 1e-5)
          * p[f"{name}.weight"] + p[f"{name}.bias"])


def np_resnet(p, images, blocks):
  x = (images / 255.0 - resnet.MEAN) / resnet.STD
  x = np.maximum(np_bn(np_conv(x, p["conv1.weight"], 1), p, "bn1"), 0)
  for stage, planes in enumerate((16, 32, 64), start=1):
    for i in range(blocks):
      pre, stride = f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1
      h = np.maximum(np_bn(np_conv(x, p[f"{pre}.conv1.weight"], stride), p, f"{pre}.bn1"), 0)
      h = np_bn(np_conv(h, p[f"{pre}.conv2.weight"], 1), p, f"{pre}.bn2")
      if x.shape[-1] != planes:  # option A: subsample, zero channels on both sides
        q = (planes - x.shape[-1]) // 2
        x = np.concatenate([np.zeros(x[:, ::2, ::2].shape[:3] + (q,)), x[:, ::2, ::2],
                            np.zeros(x[:, ::2, ::2].shape[:3] + (q,))], -1)
      x = np.maximum(h + x, 0)
  features = x.mean(axis=(1, 2))
  return features @ p["linear.weight"].T + p["linear.bias"], features


def state_dict(blocks=1, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in resnet._expected_shapes(blocks, classes).items():
    value = rng.normal(scale=0.3, size=shape)
    if name.endswith("running_var"):
      value = rng.uniform(0.5, 2.0, size=shape)
    out[name] = value.astype(np.float32)
  out["bn1.num_batches_tracked"] = np.array(7)  # PyTorch's extra entries are ignored
  return out


@pytest.mark.parametrize("blocks", [1, 2])
def test_forward_matches_a_numpy_resnet(tmp_path, blocks):
  weights = state_dict(blocks)
  path = str(tmp_path / "resnet.npz")
  np.savez(path, **weights)
  extractor = resnet.ResNetFeatures(path, batch_size=3)
  assert extractor.blocks == blocks and extractor.num_classes == 10
  images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
  features, logits = extractor(images)
  ref_logits, ref_features = np_resnet(weights, images.astype(np.float64), blocks)
  assert features.shape == (5, 64) and logits.shape == (5, 10)
  np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_bad_weight_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="evaluation.resnet_weights"):
    resnet.ResNetFeatures(str(tmp_path / "missing.npz"))
  text = tmp_path / "text.npz"
  text.write_text("not an archive")
  with pytest.raises(ValueError, match="is not an .npz archive"):
    resnet.ResNetFeatures(str(text))
  weights = state_dict()
  weights["layer2.0.conv1.weight"] = weights["layer2.0.conv1.weight"][:, :8]
  np.savez(tmp_path / "shape.npz", **weights)
  with pytest.raises(ValueError, match=r"layer2.0.conv1.weight has shape \(32, 8, 3, 3\)"):
    resnet.ResNetFeatures(str(tmp_path / "shape.npz"))
  weights = state_dict()
  del weights["layer3.0.bn2.running_var"]
  np.savez(tmp_path / "missing_array.npz", **weights)
  with pytest.raises(ValueError, match="lacks layer3.0.bn2.running_var"):
    resnet.ResNetFeatures(str(tmp_path / "missing_array.npz"))
  np.savez(tmp_path / "ok.npz", **state_dict())
  with pytest.raises(ValueError, match="RGB images"):
    resnet.ResNetFeatures(str(tmp_path / "ok.npz"))(np.zeros((2, 8, 8, 1), np.uint8))


def test_the_evaluation_scores_samples_in_the_resnets_features(tmp_path):
  """evaluation.extractor="resnet": class agreement is the share of samples the ResNet puts
  in their class; the Frechet distance is the one between its features."""
  from resgen_jax import config_base, stages
  from resgen_jax.evaluation import classifier, frechet
  np.savez(tmp_path / "r.npz", **state_dict())
  config = config_base.base_config()
  config.evaluation.extractor = "resnet"
  with pytest.raises(ValueError, match="needs evaluation.resnet_weights"):
    stages.extractors.feature_extractor(config, str(tmp_path))
  config.evaluation.resnet_weights = str(tmp_path / "r.npz")
  extractor = stages.extractors.feature_extractor(config, str(tmp_path))
  rng = np.random.default_rng(2)
  real = rng.integers(0, 256, (40, 8, 8, 3)).astype(np.uint8)
  fake = rng.integers(0, 128, (30, 8, 8, 3)).astype(np.uint8)
  real_labels, fake_labels = rng.integers(0, 10, 40), rng.integers(0, 10, 30)
  evaluator = classifier.ClassifierEvaluator(None, 10, real, real_labels, extractor=extractor)
  scores = evaluator.evaluate(fake, fake_labels)
  f_real, l_real = extractor(real)
  f_fake, l_fake = extractor(fake)
  assert scores["class_agreement"] == pytest.approx(np.mean(l_fake.argmax(-1) == fake_labels))
  assert evaluator.reference()["class_agreement"] == pytest.approx(
      np.mean(l_real.argmax(-1) == real_labels))
  expected = frechet.frechet_distance(*frechet.gaussian_stats(f_fake),
                                      *frechet.gaussian_stats(f_real))
  assert scores["frechet_distance"] == pytest.approx(expected, rel=1e-6)
