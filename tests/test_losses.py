"""Tests of resgen_jax.codec.losses: reconstruction, LPIPS and its weight file, PatchGAN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resgen_jax.codec import losses

# 32x32 is the smallest size at which every VGG16 feature map (down to 2x2) is non-trivial.
IMAGE_SIZE = 32
BATCH = 2


def _images(seed, channels=3, size=IMAGE_SIZE):
  """Random images ``[BATCH, size, size, channels]`` in [-1, 1]."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (BATCH, size, size, channels)), jnp.float32)


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def lpips_params():
  return jax.jit(losses.LPIPS().init)(jax.random.key(0), _images(0), _images(1))["params"]


@pytest.fixture(scope="module")
def lpips_apply():
  return jax.jit(losses.LPIPS().apply)


@pytest.fixture(scope="module")
def weight_file(lpips_params, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lpips") / "lpips_vgg.npz")
  losses.save_lpips_params(lpips_params, path)
  return path


# ---------------------------------------------------------------------------------------
# Reconstruction


@pytest.mark.parametrize("kind, reference", [
    ("l1", lambda d: np.mean(np.abs(d))),
    ("l2", lambda d: np.mean(d**2)),
])
def test_reconstruction_loss_matches_numpy(kind, reference):
  x, x_hat = _images(0), _images(1)
  expected = reference(np.asarray(x_hat, np.float64) - np.asarray(x, np.float64))
  np.testing.assert_allclose(losses.reconstruction_loss(x, x_hat, kind), expected, rtol=1e-5)


def test_reconstruction_loss_rejects_unknown_kind():
  with pytest.raises(ValueError, match="'huber'"):
    losses.reconstruction_loss(_images(0), _images(1), "huber")


# ---------------------------------------------------------------------------------------
# LPIPS combination math


def _numpy_lpips_distance(feats_x, feats_y, kernels):
  """Slow float64 reference of LPIPS's normalise / squared diff / lin / spatial mean / sum."""
  batch = feats_x[0].shape[0]
  total = np.zeros(batch)
  for fx, fy, kernel in zip(feats_x, feats_y, kernels):
    fx, fy = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
    w = np.asarray(kernel, np.float64)[0, 0, :, 0]
    _, height, width, _ = fx.shape
    for b in range(batch):
      acc = 0.0
      for i in range(height):
        for j in range(width):
          nx = fx[b, i, j] / (np.sqrt(np.sum(fx[b, i, j]**2)) + 1e-10)
          ny = fy[b, i, j] / (np.sqrt(np.sum(fy[b, i, j]**2)) + 1e-10)
          acc += np.sum(w * (nx - ny)**2)
      total[b] += acc / (height * width)
  return total


def _random_features(rng, shapes):
  # ReLU-like features: non-negative, with some all-zero vectors as VGG produces.
  feats = []
  for shape in shapes:
    f = np.maximum(rng.normal(size=shape), 0.0).astype(np.float32)
    f[:, 0, 0, :] = 0.0
    feats.append(jnp.asarray(f))
  return feats


def test_lpips_distance_matches_numpy():
  rng = np.random.default_rng(0)
  shapes = [(BATCH, 4, 4, 3), (BATCH, 2, 3, 5), (BATCH, 1, 1, 7)]
  fx, fy = _random_features(rng, shapes), _random_features(rng, shapes)
  kernels = [jnp.asarray(rng.uniform(0, 1, (1, 1, s[-1], 1)), jnp.float32) for s in shapes]
  got = losses.lpips_distance(fx, fy, kernels)
  assert got.shape == (BATCH,)
  np.testing.assert_allclose(got, _numpy_lpips_distance(fx, fy, kernels), rtol=1e-5)


def test_lpips_distance_gradient_is_finite_at_zero_features():
  zeros = [jnp.zeros((1, 2, 2, 4))]
  ones = [jnp.ones((1, 2, 2, 4))]
  kernel = [jnp.ones((1, 1, 4, 1))]
  for a, b in ((zeros, ones), (zeros, zeros)):
    grad = jax.grad(lambda f: losses.lpips_distance(f, b, kernel).sum())(a)
    assert np.all(np.isfinite(grad[0]))


def test_lpips_distance_rejects_mismatched_layer_counts():
  f = [jnp.ones((1, 2, 2, 4))]
  with pytest.raises(ValueError, match="lin kernels"):
    losses.lpips_distance(f, f, [])


# ---------------------------------------------------------------------------------------
# VGG16 features and the LPIPS module


def test_vgg_features_shapes():
  feats = jax.eval_shape(lambda x: losses.VGG16Features().init_with_output(
      jax.random.key(0), x)[0], _images(0))
  assert [f.shape for f in feats] == [
      (BATCH, 32, 32, 64), (BATCH, 16, 16, 128), (BATCH, 8, 8, 256), (BATCH, 4, 4, 512),
      (BATCH, 2, 2, 512)]


def _conv3x3_same(x, kernel, bias):
  """numpy 3x3 SAME cross-correlation, HWIO kernel: the convention of torch and Flax."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],)) + bias
  for di in range(3):
    for dj in range(3):
      out += padded[:, di:di + height, dj:dj + width] @ kernel[di, dj]
  return out


def test_vgg_first_layer_preprocessing_and_layout(lpips_params):
  # With conv1 set to the identity, relu1_2 = relu(conv0(lpips_scaling(x))), which pins the
  # shift / scale constants, the SAME padding and the HWIO kernel layout.
  vgg = {k: dict(v) for k, v in lpips_params["vgg"].items()}
  identity = np.zeros((3, 3, 64, 64), np.float32)
  identity[1, 1] = np.eye(64)
  vgg["conv1"] = {"kernel": jnp.asarray(identity), "bias": jnp.zeros(64)}
  x = _images(3, size=8)
  relu1_2 = losses.VGG16Features().apply({"params": vgg}, x)[0]
  scaled = (np.asarray(x, np.float64) - np.array([-.030, -.088, -.188])) / np.array(
      [.458, .448, .450])
  expected = np.maximum(_conv3x3_same(scaled, np.asarray(vgg["conv0"]["kernel"], np.float64),
                                      np.asarray(vgg["conv0"]["bias"], np.float64)), 0.0)
  np.testing.assert_allclose(relu1_2, expected, rtol=1e-4, atol=1e-4)


def test_lpips_param_tree_matches_file_format(lpips_params):
  assert {k: v.shape for k, v in _flat(lpips_params).items()} == losses.lpips_param_shapes()
  for k in range(5):
    assert np.all(np.asarray(lpips_params["lin"][str(k)]["kernel"]) >= 0)


def test_lpips_module_is_vgg_features_then_lpips_distance(lpips_params, lpips_apply):
  x, y = _images(0), _images(1)
  vgg = losses.VGG16Features()
  kernels = [lpips_params["lin"][str(k)]["kernel"] for k in range(5)]
  expected = losses.lpips_distance(vgg.apply({"params": lpips_params["vgg"]}, x),
                                   vgg.apply({"params": lpips_params["vgg"]}, y), kernels)
  np.testing.assert_allclose(lpips_apply({"params": lpips_params}, x, y), expected,
                             rtol=1e-5)


def test_lpips_is_a_distance(lpips_params, lpips_apply):
  x, y = _images(0), _images(1)
  variables = {"params": lpips_params}
  d_xx = lpips_apply(variables, x, x)
  d_xy = lpips_apply(variables, x, y)
  d_yx = lpips_apply(variables, y, x)
  assert d_xx.shape == d_xy.shape == (BATCH,)
  np.testing.assert_allclose(d_xx, 0.0, atol=1e-6)
  assert np.all(d_xy > 1e-3)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)


def test_lpips_grayscale_is_tiled_rgb(lpips_params):
  x, y = _images(0, channels=1), _images(1, channels=1)
  lpips = losses.LPIPS()
  gray = lpips.apply({"params": lpips_params}, x, y)
  rgb = lpips.apply({"params": lpips_params}, jnp.tile(x, (1, 1, 1, 3)), jnp.tile(y, (1, 1, 1, 3)))
  assert gray.shape == (BATCH,)
  np.testing.assert_allclose(gray, rgb, rtol=1e-6)


def test_lpips_rejects_two_channel_images(lpips_params):
  x = _images(0, channels=2)
  with pytest.raises(ValueError, match="input channels"):
    losses.LPIPS().apply({"params": lpips_params}, x, x)


def test_perceptual_loss_is_batch_mean_with_finite_gradient(lpips_params, lpips_apply):
  x, x_hat = _images(0), _images(1)
  loss_and_grad = jax.jit(jax.value_and_grad(losses.perceptual_loss, argnums=2))
  loss, grad = loss_and_grad(lpips_params, x, x_hat)
  np.testing.assert_allclose(loss, np.mean(lpips_apply({"params": lpips_params}, x, x_hat)),
                             rtol=1e-5)
  assert grad.shape == x_hat.shape
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


# ---------------------------------------------------------------------------------------
# Weight file


def test_save_load_round_trip(lpips_params, lpips_apply, weight_file):
  loaded = losses.load_lpips_params(weight_file)
  original, restored = _flat(lpips_params), _flat(loaded)
  assert original.keys() == restored.keys()
  for key in original:
    assert restored[key].dtype == np.float32
    np.testing.assert_array_equal(restored[key], original[key])
  x, y = _images(0), _images(1)
  np.testing.assert_array_equal(lpips_apply({"params": loaded}, x, y),
                                lpips_apply({"params": lpips_params}, x, y))


def _drop_key(flat):
  del flat["vgg/conv5/bias"]
  return "vgg/conv5/bias"


def _add_key(flat):
  flat["lin/5/kernel"] = np.zeros((1, 1, 512, 1), np.float32)
  return "lin/5/kernel"


def _reshape_key(flat):
  flat["vgg/conv0/kernel"] = np.zeros((3, 3, 64, 3), np.float32)  # an un-transposed kernel
  return "vgg/conv0/kernel"


def _negate_lin(flat):
  flat["lin/2/kernel"] = -flat["lin/2/kernel"]
  return "lin/2/kernel"


@pytest.mark.parametrize("corrupt, problem", [
    (_drop_key, "missing key"),
    (_add_key, "unexpected key"),
    (_reshape_key, "wrong shape"),
    (_negate_lin, "negative weights"),
])
def test_load_rejects_bad_files(weight_file, tmp_path, corrupt, problem):
  with np.load(weight_file) as data:
    flat = dict(data)
  key = corrupt(flat)
  path = tmp_path / "bad.npz"
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=problem) as error:
    losses.load_lpips_params(str(path))
  assert key in str(error.value)


def test_wrong_shape_error_names_expected_shape(weight_file, tmp_path):
  with np.load(weight_file) as data:
    flat = dict(data)
  _reshape_key(flat)
  path = tmp_path / "bad.npz"
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=r"got \(3, 3, 64, 3\), expected \(3, 3, 3, 64\)"):
    losses.load_lpips_params(str(path))


def test_load_missing_file_names_path_and_format(tmp_path):
  path = str(tmp_path / "nowhere" / "lpips.npz")
  with pytest.raises(FileNotFoundError, match="vgg/conv") as error:
    losses.load_lpips_params(path)
  assert path in str(error.value)


def test_load_rejects_single_array_file(tmp_path):
  path = tmp_path / "single.npy"
  np.save(path, np.zeros(3))
  with pytest.raises(ValueError, match="not an .npz"):
    losses.load_lpips_params(str(path))


def test_save_rejects_incomplete_params(lpips_params, tmp_path):
  params = {"vgg": lpips_params["vgg"]}
  path = tmp_path / "partial.npz"
  with pytest.raises(ValueError, match="lin/0/kernel"):
    losses.save_lpips_params(params, str(path))
  assert not path.exists()


# ---------------------------------------------------------------------------------------
# GAN


@pytest.mark.parametrize("size, channels, num_layers, grid", [
    (16, 16, 2, 4),   # 16 -> 8 -> 4 -> (stride 1) 4
    (64, 64, 3, 8),   # 64 -> 32 -> 16 -> 8 -> (stride 1) 8
    (16, 24, 1, 8),   # widths 48: GroupNorm needs a divisor of 48 (16 groups)
])
def test_patch_discriminator_output_shape(size, channels, num_layers, grid):
  disc = losses.PatchDiscriminator(channels=channels, num_layers=num_layers)
  x = _images(0, size=size)
  logits, variables = jax.eval_shape(lambda im: disc.init_with_output(jax.random.key(0), im), x)
  assert logits.shape == (BATCH, grid, grid, 1)
  top_width = channels * min(2**num_layers, 8)
  assert variables["params"][f"Conv_{num_layers}"]["kernel"].shape[-1] == top_width


def test_patch_discriminator_runs_on_small_images():
  disc = losses.PatchDiscriminator(channels=16, num_layers=2)
  x = _images(0, size=16)
  params = disc.init(jax.random.key(0), x)
  logits = disc.apply(params, x)
  assert logits.shape == (BATCH, 4, 4, 1)
  assert np.all(np.isfinite(logits))


def test_patch_discriminator_rejects_zero_layers():
  with pytest.raises(ValueError, match="num_layers"):
    losses.PatchDiscriminator(num_layers=0).init(jax.random.key(0), _images(0, size=16))


def test_hinge_losses_match_numpy():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(BATCH, 4, 4, 1)).astype(np.float32) * 2
  fake = rng.normal(size=(BATCH, 4, 4, 1)).astype(np.float32) * 2
  expected_d = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
  np.testing.assert_allclose(losses.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake)),
                             expected_d, rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(jnp.asarray(fake)), -np.mean(fake),
                             rtol=1e-6)


def test_gan_weight_at_switches_on_at_start_under_jit():
  weight_at = jax.jit(losses.gan_weight_at, static_argnums=(2,))
  start, weight = 100, 0.5
  for step, expected in ((0, 0.0), (start - 1, 0.0), (start, weight), (start + 10, weight)):
    value = weight_at(jnp.int32(step), weight, start)
    assert value.dtype == jnp.float32
    assert float(value) == expected
