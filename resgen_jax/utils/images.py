"""Image conversions, PSNR and PNG grids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from resgen_jax.utils import files

# PSNR of a perfect reconstruction would be infinite; the MSE floor caps it at 100 dB.
MIN_MSE = 1e-10


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
