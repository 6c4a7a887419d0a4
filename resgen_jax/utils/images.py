"""Image conversions, PSNR, SSIM and PNG grids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from resgen_jax.utils import files

# PSNR of a perfect reconstruction would be infinite; the MSE floor caps it at 100 dB.
MIN_MSE = 1e-10
# SSIM as Wang et al. (2004) and tf.image.ssim: an 11 x 11 Gaussian window of std 1.5 over
# the valid positions, constants K1 = 0.01 and K2 = 0.03 of the [0, 1] data range.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_float(images):
  """uint8 ``[..., H, W, C]`` in [0, 255] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float ``[..., H, W, C]`` in [-1, 1] -> uint8 numpy (rounded, clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def psnr(x_hat, x):
  """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale. -> ``[B]``."""
  mse = jnp.mean(jnp.square((x_hat - x) / 2.0), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, MIN_MSE))


def ssim_window() -> np.ndarray:
  """The normalised 1-D Gaussian ``[SSIM_WINDOW]``; the 2-D window is its outer product."""
  offsets = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
  g = np.exp(-0.5 * np.square(offsets / SSIM_SIGMA))
  return g / g.sum()


def _gaussian_blur_valid(z):
  """Separable Gaussian filtering of ``[..., H, W, C]`` over the valid positions only."""
  g, n = ssim_window(), SSIM_WINDOW
  h, w = z.shape[-3], z.shape[-2]
  z = sum(g[k] * z[..., k:h - n + 1 + k, :, :] for k in range(n))
  return sum(g[k] * z[..., :, k:w - n + 1 + k, :] for k in range(n))


def ssim(x_hat, x):
  """Per-image SSIM of images in [-1, 1], measured on the [0, 1] scale: the mean of the
  SSIM map over valid window positions and channels. -> ``[...]`` (e.g. ``[B]``)."""
  if min(x.shape[-3], x.shape[-2]) < SSIM_WINDOW:
    raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, "
                     f"got {x.shape[-3]} x {x.shape[-2]}")
  a, b = (x_hat + 1.0) / 2.0, (x + 1.0) / 2.0
  mu_a, mu_b = _gaussian_blur_valid(a), _gaussian_blur_valid(b)
  var_a = _gaussian_blur_valid(a * a) - mu_a * mu_a
  var_b = _gaussian_blur_valid(b * b) - mu_b * mu_b
  cov = _gaussian_blur_valid(a * b) - mu_a * mu_b
  c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


def grid(images: np.ndarray, columns: int) -> np.ndarray:
  """uint8 ``[N, H, W, C]`` -> one uint8 ``[rows*H, columns*W, C]`` image (blank padded)."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  canvas = np.zeros((rows * h, columns * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, columns)
    canvas[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
  return canvas


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 ``[H, W, C]`` image atomically (C = 1 is saved as grayscale)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image[..., 0] if image.shape[-1] == 1 else image
  with files.atomic_write(path) as tmp:
    Image.fromarray(image).save(tmp, format="PNG")
