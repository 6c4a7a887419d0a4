"""A pretrained CIFAR ResNet (He et al. 2016, the "option A" ResNet-20/32/44/56) as an
independent scorer of 32x32 RGB samples: class agreement and a Frechet distance,
precision and recall in its 64-d pooled features (``evaluation.extractor="resnet"``).

Weights come from a file the user gives (``evaluation.resnet_weights``): an ``.npz`` of
float32 arrays named as in the PyTorch ``state_dict`` of that architecture (no pickle):
``conv1.weight [16, 3, 3, 3]`` in ``[out, in, kh, kw]`` layout, ``bn1.{weight, bias,
running_mean, running_var}``, ``layer{1,2,3}.{i}.{conv1, bn1, conv2, bn2}.*`` for ``i <
n`` blocks per stage (n = 3 for ResNet-20, 9 for ResNet-56, read from the file), and
``linear.{weight [K, 64], bias [K]}``. Other entries (e.g. ``num_batches_tracked``) are
ignored.

The network: 3x3 conv to 16 channels, BN, ReLU; stages of 16/32/64 channels with n basic
blocks (conv-BN-ReLU-conv-BN plus the shortcut, then ReLU; the first block of stages 2 and
3 has stride 2); where the shape changes the shortcut is ``x[:, ::2, ::2]`` zero-padded
with planes/4 channels on each side; global average pooling to 64 features; a linear
layer to K logits. BN in inference form with epsilon 1e-5. Input: RGB in [0, 1],
normalised by ``MEAN`` and ``STD``.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from resgen_jax.evaluation import classifier

BN_EPS = 1e-5
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
STAGE_CHANNELS = (16, 32, 64)
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _expected_shapes(blocks: int, num_classes: int) -> Dict[str, Tuple[int, ...]]:
  """Every array the architecture reads, with its shape."""
  shapes = {"conv1.weight": (16, 3, 3, 3), "linear.weight": (num_classes, 64),
            "linear.bias": (num_classes,)}
  shapes.update({f"bn1.{f}": (16,) for f in BN_FIELDS})
  channels_in = 16
  for stage, channels in enumerate(STAGE_CHANNELS, start=1):
    for i in range(blocks):
      prefix = f"layer{stage}.{i}"
      shapes[f"{prefix}.conv1.weight"] = (channels, channels_in, 3, 3)
      shapes[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
      for bn in ("bn1", "bn2"):
        shapes.update({f"{prefix}.{bn}.{f}": (channels,) for f in BN_FIELDS})
      channels_in = channels
  return shapes


def load_weights(path: str) -> Tuple[Dict[str, np.ndarray], int]:
  """Reads and checks a CIFAR ResNet state dict. -> (arrays by name, blocks per stage).
  A missing file, a non-npz file, a missing array or a wrong shape raises an error naming
  it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no CIFAR ResNet weights at {path} (evaluation.resnet_weights)")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {name: np.asarray(data[name], np.float32) for name in data.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path} is not an .npz archive of a CIFAR ResNet state dict: {e}") from e
  blocks = 0
  while f"layer1.{blocks}.conv1.weight" in arrays:
    blocks += 1
  if "linear.weight" not in arrays or blocks == 0:
    raise ValueError(f"{path} does not hold a CIFAR ResNet state dict (needs conv1.weight, "
                     f"layer1.0.conv1.weight, ..., linear.weight)")
  expected = _expected_shapes(blocks, arrays["linear.weight"].shape[0])
  for name, shape in expected.items():
    if name not in arrays:
      raise ValueError(f"{path} lacks {name} of a ResNet with {blocks} blocks per stage")
    if arrays[name].shape != shape:
      raise ValueError(f"{path}: {name} has shape {arrays[name].shape}, expected {shape}")
  return {name: arrays[name] for name in expected}, blocks


def _conv(x, weight, stride: int):
  """3x3 convolution, padding 1: x ``[B, H, W, Cin]``, weight ``[out, in, 3, 3]``."""
  return jax.lax.conv_general_dilated(
      x, jnp.transpose(weight, (2, 3, 1, 0)), (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)


def _bn(x, params, name: str):
  scale = params[f"{name}.weight"] / jnp.sqrt(params[f"{name}.running_var"] + BN_EPS)
  return (x - params[f"{name}.running_mean"]) * scale + params[f"{name}.bias"]


def _shortcut(x, channels: int):
  """Option A: subsample by 2 and zero-pad the channels to ``channels``."""
  pad = (channels - x.shape[-1]) // 2
  return jnp.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (pad, pad)))


def forward(params: Dict[str, jax.Array], images: jax.Array, blocks: int):
  """uint8 images ``[B, 32, 32, 3]`` -> (logits ``[B, K]``, pooled features ``[B, 64]``)."""
  x = (images.astype(jnp.float32) / 255.0 - MEAN) / STD
  x = jax.nn.relu(_bn(_conv(x, params["conv1.weight"], 1), params, "bn1"))
  for stage, channels in enumerate(STAGE_CHANNELS, start=1):
    for i in range(blocks):
      prefix = f"layer{stage}.{i}"
      stride = 2 if stage > 1 and i == 0 else 1
      h = jax.nn.relu(_bn(_conv(x, params[f"{prefix}.conv1.weight"], stride), params,
                          f"{prefix}.bn1"))
      h = _bn(_conv(h, params[f"{prefix}.conv2.weight"], 1), params, f"{prefix}.bn2")
      shortcut = _shortcut(x, channels) if stride > 1 or x.shape[-1] != channels else x
      x = jax.nn.relu(h + shortcut)
  features = jnp.mean(x, axis=(1, 2))
  return features @ params["linear.weight"].T + params["linear.bias"], features


class ResNetFeatures:
  """The pretrained ResNet as an extractor (``features.Extractor``): pooled features and
  class logits of RGB uint8 images ``[n, H, W, 3]``, float64."""

  def __init__(self, path: str, batch_size: int = classifier.PREDICT_BATCH_SIZE):
    arrays, self.blocks = load_weights(path)
    self.num_classes = arrays["linear.weight"].shape[0]
    self.params = jax.tree.map(jnp.asarray, arrays)
    self.batch_size = batch_size
    self._forward = jax.jit(functools.partial(forward, blocks=self.blocks))

  def __call__(self, images) -> Tuple[np.ndarray, np.ndarray]:
    images = classifier.check_images(images)
    if images.shape[-1] != 3:
      raise ValueError(f"the CIFAR ResNet scores RGB images, got {images.shape[-1]} channels")
    logits, features = [], []
    for first in range(0, len(images), self.batch_size):
      l, f = self._forward(self.params, jnp.asarray(images[first:first + self.batch_size]))
      logits.append(np.asarray(l, np.float64))
      features.append(np.asarray(f, np.float64))
    return np.concatenate(features), np.concatenate(logits)
