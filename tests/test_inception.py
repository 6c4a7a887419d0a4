"""The FID Inception module: architecture, determinism, and weight files (written here)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resgen_jax.evaluation import inception

# torchvision's Inception-v3 without the auxiliary head has 23,834,568 parameters with a
# 1000-way classifier; the FID graph's 1008-way classifier adds 8 x 2049.
FID_INCEPTION_PARAMETERS = 23_834_568 + 8 * 2049


def random_variables(seed=0):
  """Random FID Inception weights (He-scaled kernels, positive variances), so every layer
  matters to the output."""
  abstract = inception.abstract_variables()
  rng = np.random.default_rng(seed)
  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
    fan_in = np.prod(x.shape[:-1]) if x.ndim > 1 else 1
    return jnp.asarray(rng.normal(size=x.shape) * np.sqrt(2.0 / fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def variables():
  return random_variables()


@pytest.fixture(scope="module")
def forward():
  return jax.jit(inception.FIDInception().apply)


def images(n=2, size=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_architecture_and_outputs(variables, forward):
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert count == FID_INCEPTION_PARAMETERS
  features, logits = forward(variables, images())
  assert features.shape == (2, inception.FEATURES) and logits.shape == (2, inception.LOGITS)
  assert features.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  again, _ = forward(variables, images())
  np.testing.assert_array_equal(np.asarray(features), np.asarray(again))  # deterministic
  as_float, _ = forward(variables, images().astype(np.float32) / 255.0)
  np.testing.assert_allclose(as_float, features, rtol=1e-3)  # uint8 == [0, 1] floats
  other, _ = forward(variables, images(seed=1))
  assert not np.allclose(other, features)
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    forward(variables, images()[..., :1])


def test_weights_round_trip_through_the_pytorch_layout(tmp_path, variables, forward):
  path = str(tmp_path / "fid_inception.npz")
  inception.save_params(path, variables)
  with np.load(path) as data:
    assert data["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)  # OIHW
    assert data["fc.weight"].shape == (inception.LOGITS, inception.FEATURES)
    assert "Conv2d_1a_3x3.bn.running_var" in data.files
  loaded = inception.load_params(path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(forward(loaded, images())[0], forward(variables, images())[0])


def test_missing_or_mismatched_weights_name_the_expected_file(tmp_path, variables):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.*6726825d"):
    inception.load_params(str(tmp_path / "absent.npz"))
  path = str(tmp_path / "w.npz")
  inception.save_params(path, variables)
  with np.load(path) as data:
    arrays = dict(data)
  arrays["fc.weight"] = arrays["fc.weight"][:1000]  # a 1000-class Inception
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 2048\).*6726825d"):
    inception.load_params(path)
  del arrays["fc.weight"]
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="missing \\['fc.weight'\\]"):
    inception.load_params(path)
  with open(path, "wb") as f:
    f.write(b"not an npz")
  with pytest.raises(ValueError, match="not a readable .npz"):
    inception.load_params(path)
  fake = tmp_path / inception.SOURCE_FILE
  fake.write_bytes(b"pretending to be a checkpoint")
  with pytest.raises(ValueError, match="it is not pt_inception"):
    inception.convert(str(fake), str(tmp_path / "out.npz"))
  assert not os.path.exists(tmp_path / "out.npz")
