"""Optional training losses of the image tokenizer, in the RQ-VAE / VQGAN style.

Images are float32 ``[B, H, W, C]`` in [-1, 1] throughout.

* :func:`reconstruction_loss`: L1 or L2, mean over every element.
* :func:`perceptual_loss`: LPIPS (VGG16 variant) with weights read from a file the user gives;
  nothing is ever downloaded.
* :class:`PatchDiscriminator` with :func:`hinge_d_loss` / :func:`hinge_g_loss` and the delayed
  start :func:`gan_weight_at`.

LPIPS weight file
-----------------
A flat ``.npz`` (read with ``np.load(path, allow_pickle=False)``) holding exactly these
float arrays, listed with their shapes by :func:`lpips_param_shapes`:

* ``vgg/conv{i}/kernel`` ``[3, 3, C_in, C_out]`` (HWIO) and ``vgg/conv{i}/bias`` ``[C_out]``
  for the 13 VGG16 convolutions ``i = 0..12`` in network order;
* ``lin/{k}/kernel`` ``[1, 1, C_k, 1]`` for the 5 non-negative LPIPS "lin" heads ``k = 0..4``
  (``C_k`` = 64, 128, 256, 512, 512).

The keys are the ``/``-joined paths of the ``LPIPS`` parameter tree, so
:func:`load_lpips_params` and :func:`save_lpips_params` are inverses.

Converting the public weights (once, in an environment with torch): the VGG16 convolutions
are torchvision's ImageNet ``vgg16`` (the 13 ``Conv2d`` of ``vgg16().features``, in order),
stored OIHW, so transpose each ``weight`` with ``(2, 3, 1, 0)`` to HWIO and keep ``bias``
as is. The lin heads are ``lin{k}.model.1.weight`` ``[1, C, 1, 1]`` from the LPIPS package's
``weights/v0.1/vgg.pth``; the same ``(2, 3, 1, 0)`` transpose gives ``[1, 1, C, 1]``. Put the
arrays in a dict under the keys above, turn it into a tree with
``flax.traverse_util.unflatten_dict(flat, sep="/")`` and write it with
:func:`save_lpips_params`, which checks every key and shape before writing.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resgen_jax.utils import files

Array = jax.Array

RECONSTRUCTION_KINDS = ("l1", "l2")

# VGG16 convolution widths, one tuple per block; a 2x2 max pool precedes every block but the
# first, and LPIPS reads the ReLU output of each block's last conv (relu1_2 ... relu5_3).
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG16_KERNEL = (3, 3)
VGG16_POOL = (2, 2)
RGB_CHANNELS = 3

# LPIPS's ScalingLayer: maps [-1, 1] images to the statistics VGG16 was trained on.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# LPIPS's normalize_tensor epsilon: keeps x / ||x|| finite for an all-zero feature vector.
NORMALIZE_EPS = 1e-10

# Separator between the levels of a parameter path in the flat weight file.
KEY_SEPARATOR = "/"

# PatchGAN (pix2pix / VQGAN): 4x4 convs, LeakyReLU slope 0.2, widths capped at 8x the base.
DISC_KERNEL = (4, 4)
LEAKY_RELU_SLOPE = 0.2
MAX_CHANNEL_MULTIPLIER = 8
# GroupNorm uses gcd(32, C) groups: 32 as in the autoencoder, and always a divisor of C.
MAX_NORM_GROUPS = 32


def reconstruction_loss(x: Array, x_hat: Array, kind: str) -> Array:
  """Mean absolute ("l1") or squared ("l2") error over every element. -> scalar float32."""
  error = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.abs(error))
  if kind == "l2":
    return jnp.mean(jnp.square(error))
  raise ValueError(f"unknown reconstruction loss kind {kind!r}; expected one of "
                   f"{RECONSTRUCTION_KINDS}")


# ----------------------------------------------------------------------------------------
# LPIPS


def _vgg_conv_widths() -> List[int]:
  """Output widths of the 13 VGG16 convolutions, in network order."""
  return [width for block in VGG16_BLOCKS for width in block]


def _feature_widths() -> List[int]:
  """Channels of the 5 feature maps LPIPS compares (the last conv of each block)."""
  return [block[-1] for block in VGG16_BLOCKS]


def lpips_param_shapes() -> Dict[str, Tuple[int, ...]]:
  """The weight-file format: flat key -> expected shape (see the module docstring)."""
  shapes = {}
  in_channels = RGB_CHANNELS
  for i, width in enumerate(_vgg_conv_widths()):
    shapes[f"vgg/conv{i}/kernel"] = VGG16_KERNEL + (in_channels, width)
    shapes[f"vgg/conv{i}/bias"] = (width,)
    in_channels = width
  for k, width in enumerate(_feature_widths()):
    shapes[f"lin/{k}/kernel"] = (1, 1, width, 1)
  return shapes


def unit_normalize(features: Array) -> Array:
  """``x / (||x|| + eps)`` along channels, as LPIPS's normalize_tensor. ``[..., C]``."""
  squared_norm = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  # sqrt has an infinite derivative at 0; the inner where keeps the gradient of an all-zero
  # feature vector finite while the outer one keeps the forward value exactly LPIPS's.
  nonzero = squared_norm > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared_norm, 1.0)), 0.0)
  return features / (norm + NORMALIZE_EPS)


def lpips_distance(feats_x: Sequence[Array], feats_y: Sequence[Array],
                   lin_kernels: Sequence[Array]) -> Array:
  """Combines per-layer features into the LPIPS distance. -> ``[B]``.

  For each layer k: unit-normalise both maps along channels, square the difference, weight
  the channels with the 1x1 "lin" kernel, average over space; then sum over layers.

  Args:
    feats_x: feature maps ``[B, H_k, W_k, C_k]`` of the first images.
    feats_y: feature maps of the second images, same shapes.
    lin_kernels: ``[1, 1, C_k, 1]`` per layer (no bias).
  """
  if not len(feats_x) == len(feats_y) == len(lin_kernels):
    raise ValueError(f"lpips_distance needs as many lin kernels as feature maps; got "
                     f"{len(feats_x)} / {len(feats_y)} feature maps and {len(lin_kernels)} "
                     "kernels")
  total = 0.0
  for fx, fy, kernel in zip(feats_x, feats_y, lin_kernels):
    if fx.shape != fy.shape:
      raise ValueError(f"feature maps differ in shape: {fx.shape} vs {fy.shape}")
    diff = jnp.square(unit_normalize(fx) - unit_normalize(fy))
    weighted = jnp.einsum("bhwc,c->bhw", diff, kernel.reshape(-1),
                          precision=jax.lax.Precision.HIGHEST)
    total = total + jnp.mean(weighted, axis=(1, 2))
  return total


class VGG16Features(nn.Module):
  """The 13 convs of VGG16 on LPIPS-scaled input; returns relu1_2, ..., relu5_3.

  Input ``[B, H, W, C]`` in [-1, 1] with C = 3 (RGB) or 1 (grayscale, tiled to RGB).
  Output: 5 maps ``[B, H / 2^k, W / 2^k, C_k]`` for k = 0..4, C_k = 64, 128, 256, 512, 512.
  """

  @nn.compact
  def __call__(self, x: Array) -> List[Array]:
    if x.shape[-1] == 1:
      x = jnp.tile(x, (1, 1, 1, RGB_CHANNELS))
    if x.shape[-1] != RGB_CHANNELS:
      raise ValueError(f"VGG16Features needs 1 or {RGB_CHANNELS} input channels, got "
                       f"shape {x.shape}")
    h = (x.astype(jnp.float32) - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
    features = []
    conv_index = 0
    for block_index, block in enumerate(VGG16_BLOCKS):
      if block_index > 0:
        h = nn.max_pool(h, VGG16_POOL, strides=VGG16_POOL)
      for width in block:
        h = nn.relu(nn.Conv(width, VGG16_KERNEL, padding="SAME", name=f"conv{conv_index}")(h))
        conv_index += 1
      features.append(h)
    return features


def _nonnegative_init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
  """Uniform in [0, 2 / C): mean 1 / C, so a fresh head averages the channels' differences."""
  return jax.random.uniform(key, shape, dtype, 0.0, 2.0 / shape[-2])


class _LinKernel(nn.Module):
  """One LPIPS "lin" head: a bias-free 1x1 conv kernel ``[1, 1, C, 1]``."""
  channels: int

  @nn.compact
  def __call__(self) -> Array:
    return self.param("kernel", _nonnegative_init, (1, 1, self.channels, 1))


class _LinLayers(nn.Module):
  """The 5 lin heads, one per VGG feature map; parameters ``lin/{k}/kernel``."""

  @nn.compact
  def __call__(self) -> List[Array]:
    return [_LinKernel(width, name=str(k))() for k, width in enumerate(_feature_widths())]


class LPIPS(nn.Module):
  """LPIPS (VGG16) distance between two image batches ``[B, H, W, C]`` -> ``[B]``.

  Parameters: ``vgg`` (:class:`VGG16Features`) and ``lin`` (the 5 heads); their flat layout
  is the weight file format of the module docstring.
  """

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    if x.shape != y.shape:
      raise ValueError(f"LPIPS compares images of equal shape, got {x.shape} vs {y.shape}")
    vgg = VGG16Features(name="vgg")
    return lpips_distance(vgg(x), vgg(y), _LinLayers(name="lin")())


def perceptual_loss(params, x: Array, x_hat: Array) -> Array:
  """Mean LPIPS distance over the batch. params: the ``LPIPS`` params tree. -> scalar."""
  return jnp.mean(LPIPS().apply({"params": params}, x, x_hat))


def _check_flat(flat: Mapping[str, np.ndarray], source: str) -> None:
  """Raises ValueError listing every way ``flat`` departs from :func:`lpips_param_shapes`."""
  expected = lpips_param_shapes()
  problems = [f"missing key {key} (expected shape {expected[key]})"
              for key in expected if key not in flat]
  problems += [f"unexpected key {key} (shape {np.shape(flat[key])})"
               for key in sorted(flat) if key not in expected]
  for key, shape in expected.items():
    if key not in flat:
      continue
    if np.shape(flat[key]) != shape:
      problems.append(f"wrong shape for {key}: got {np.shape(flat[key])}, expected {shape}")
    elif key.startswith("lin/") and np.any(np.asarray(flat[key]) < 0):
      problems.append(f"negative weights in {key}: LPIPS lin weights are non-negative")
  if problems:
    header = (f"{source} does not match the LPIPS weight format "
              "(see resgen_jax.codec.losses and lpips_param_shapes()):")
    raise ValueError("\n  ".join([header] + problems))


def save_lpips_params(params, path: str) -> None:
  """Writes an ``LPIPS`` params tree as the flat ``.npz`` weight file (atomically)."""
  flat = {KEY_SEPARATOR.join(keys): np.asarray(value, np.float32)
          for keys, value in traverse_util.flatten_dict(params).items()}
  _check_flat(flat, "LPIPS params")
  files.save_npz(os.fspath(path), **flat)


def load_lpips_params(path: str):
  """Reads and validates the flat ``.npz`` weight file -> ``LPIPS`` params tree (float32)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"LPIPS weight file not found: {path!r}. Expected an .npz with keys "
        "vgg/conv{i}/kernel [3,3,Cin,Cout], vgg/conv{i}/bias [Cout] (i=0..12) and "
        "lin/{k}/kernel [1,1,C,1] (k=0..4); see resgen_jax.codec.losses for how to convert "
        "the public LPIPS VGG weights.")
  loaded = np.load(path, allow_pickle=False)
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise ValueError(f"{path!r} holds a single array, not an .npz archive of LPIPS weights")
  with loaded:
    flat = {key: loaded[key] for key in loaded.files}
  _check_flat(flat, repr(path))
  return traverse_util.unflatten_dict(
      {key: jnp.asarray(value, jnp.float32) for key, value in flat.items()},
      sep=KEY_SEPARATOR)


# ----------------------------------------------------------------------------------------
# GAN


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator: images ``[B, H, W, C]`` -> logits ``[B, h, w, 1]``.

  A 4x4 stride-2 conv + LeakyReLU(0.2), then ``num_layers`` blocks of 4x4 conv (stride 2,
  the last stride 1; widths ``channels * min(2^n, 8)``), GroupNorm and LeakyReLU, then a 4x4
  conv to one logit per patch. SAME padding throughout, so ``h = ceil(H / 2^num_layers)``
  (likewise w).
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.num_layers < 1 or self.channels < 1:
      raise ValueError(f"PatchDiscriminator needs num_layers >= 1 and channels >= 1, got "
                       f"num_layers={self.num_layers}, channels={self.channels}")
    h = nn.Conv(self.channels, DISC_KERNEL, strides=2, padding="SAME")(x)
    h = nn.leaky_relu(h, LEAKY_RELU_SLOPE)
    for n in range(1, self.num_layers + 1):
      width = self.channels * min(2**n, MAX_CHANNEL_MULTIPLIER)
      stride = 1 if n == self.num_layers else 2
      # The norm's bias makes a conv bias redundant.
      h = nn.Conv(width, DISC_KERNEL, strides=stride, padding="SAME", use_bias=False)(h)
      h = nn.GroupNorm(num_groups=math.gcd(MAX_NORM_GROUPS, width))(h)
      h = nn.leaky_relu(h, LEAKY_RELU_SLOPE)
    return nn.Conv(1, DISC_KERNEL, padding="SAME")(h)


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Discriminator hinge loss, VQGAN's convention (halved sum of the two hinge terms).

  ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` -> scalar.
  """
  real_term = jnp.mean(nn.relu(1.0 - logits_real))
  fake_term = jnp.mean(nn.relu(1.0 + logits_fake))
  return 0.5 * (real_term + fake_term)


def hinge_g_loss(logits_fake: Array) -> Array:
  """Generator hinge loss ``-mean(logits_fake)`` -> scalar."""
  return -jnp.mean(logits_fake)


def gan_weight_at(step, weight: float, start_step: int) -> Array:
  """GAN loss weight at ``step``: 0 before ``start_step``, ``weight`` from it on. jit-safe."""
  return jnp.where(jnp.asarray(step) >= start_step, jnp.asarray(weight, jnp.float32), 0.0)
