"""The FID Inception-v3 (the 2015-12-05 TensorFlow graph that the usual FID tools share) as a
Flax module, in float32.

This is the variant the PyTorch FID port reproduces exactly: average pools in the Inception
blocks exclude padding from their counts, and the last block max-pools its pool branch.
Images are resized bilinearly to 299 x 299 and scaled to [-1, 1]; the outputs are the
2048-d pool features (FID, precision/recall) and the 1008-way logits (Inception Score).

Weights come from a file the user gives, never from the network: an ``.npz`` whose keys are
the PyTorch FID state-dict names (``Mixed_5b.branch1x1.conv.weight``, ...), written by
``python -m resgen_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth
OUT.npz`` where PyTorch is installed (the only place a pickle is read, and only the file
whose checksum is checked). :func:`load_params` checks every name and shape and names the
expected file on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FEATURES = 2048
LOGITS = 1008  # the TF graph's classes (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299
BN_EPS = 1e-3  # the TF graph's batch-norm epsilon
SOURCE_FILE = "pt_inception-2015-12-05-6726825d.pth"
SOURCE_SHA256_PREFIX = "6726825d"  # PyTorch hub names files by their checksum's prefix
EXPECTED = (f"an .npz converted from {SOURCE_FILE} (sha256 {SOURCE_SHA256_PREFIX}...) with "
            f"`python -m resgen_jax.evaluation.inception --convert`")


class BasicConv(nn.Module):
  """Convolution without bias, batch norm (inference statistics), ReLU."""
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def avg_pool_exclude_padding(x: Array) -> Array:
  """3x3 stride-1 average pool over the valid pixels only (count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool(x: Array, strides: int = 2, padding: int = 0) -> Array:
  return nn.max_pool(x, (3, 3), strides=(strides, strides),
                     padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_exclude_padding(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(avg_pool_exclude_padding(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # the last block (Mixed_7c) max-pools; Mixed_7b averages

  @nn.compact
  def __call__(self, x):
    def split(h, prefix):
      return jnp.concatenate(
          [BasicConv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(h),
           BasicConv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(h)], axis=-1)
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = split(BasicConv(384, (1, 1), name="branch3x3_1")(x), "branch3x3_2")
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = split(BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd),
               "branch3x3dbl_3")
    pooled = max_pool(x, strides=1, padding=1) if self.max_pool_branch else (
        avg_pool_exclude_padding(x))
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """uint8 or [0, 1] float images ``[N, H, W, 3]`` -> (pool features ``[N, 2048]``, logits
  ``[N, 1008]``), float32."""

  @nn.compact
  def __call__(self, images: Array) -> Tuple[Array, Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x / 255.0
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                         antialias=False)
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))
    return features, nn.Dense(LOGITS, name="fc")(features)


# ----------------------------------------------------------------------------------------
# Weights: PyTorch FID state-dict names <-> Flax variables.
# ----------------------------------------------------------------------------------------

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_name(collection: str, path: Sequence[str]) -> str:
  """Flax variable path -> the PyTorch state-dict key."""
  *module, leaf = path
  if module and module[-1] == "bn":
    return ".".join([*module, _BN[leaf]])
  if module and module[-1] == "conv":
    return ".".join([*module, "weight"])
  return ".".join([*module, {"kernel": "weight", "bias": "bias"}[leaf]])


def _to_torch(value: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch layout: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.T if value.ndim == 2 else value


def _from_torch(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def _flat_variables(variables) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
  """``{torch name: (collection, flax path)}`` for every variable of the module."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = tuple(k.key for k in path)
    out[_torch_name(keys[0], keys[1:])] = (keys[0], keys[1:])
  return out


def _lookup(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree


def abstract_variables():
  return jax.eval_shape(FIDInception().init, jax.random.key(0),
                        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def save_params(path: str, variables) -> None:
  """Writes ``variables`` as an ``.npz`` in the PyTorch naming and layout (atomically)."""
  arrays = {}
  for name, (collection, keys) in _flat_variables(variables).items():
    arrays[name] = _to_torch(np.asarray(_lookup(variables[collection], keys), np.float32))
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_params(path: str):
  """Reads the FID Inception weights from ``path`` (see the module docstring) -> variables."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no FID Inception weights at {path}: expected {EXPECTED}")
  abstract = abstract_variables()
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable .npz ({e}); expected {EXPECTED}") from e
  wanted = _flat_variables(abstract)
  missing, extra = sorted(wanted.keys() - arrays.keys()), sorted(arrays.keys() - wanted.keys())
  if missing or extra:
    raise ValueError(f"{path} does not hold the FID Inception weights: missing "
                     f"{missing[:3]}, unexpected {extra[:3]}; expected {EXPECTED}")
  variables = {}
  for name, (collection, keys) in wanted.items():
    shape = _lookup(abstract[collection], keys).shape
    value = _from_torch(arrays[name]).astype(np.float32)
    if value.shape != shape:
      raise ValueError(f"{path}: '{name}' has shape {arrays[name].shape}, the FID Inception "
                       f"needs {_to_torch(np.zeros(shape)).shape}; expected {EXPECTED}")
    node = variables.setdefault(collection, {})
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jnp.asarray(value)
  return variables


def convert(source: str, out: str) -> None:
  """PyTorch FID checkpoint -> ``.npz`` (needs torch; checks the file's checksum first)."""
  with open(source, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if not digest.startswith(SOURCE_SHA256_PREFIX):
    raise ValueError(f"{source} has sha256 {digest[:16]}..., not {SOURCE_SHA256_PREFIX}...: "
                     f"it is not {SOURCE_FILE}")
  import torch  # pylint: disable=g-import-not-at-top  (optional; only for converting)
  state = torch.load(source, map_location="cpu", weights_only=True)
  arrays = {k: v.numpy().astype(np.float32) for k, v in state.items()
            if not k.endswith("num_batches_tracked")}
  tmp = out + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, out)
  load_params(out)  # the written file must load


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="Convert the PyTorch FID Inception weights.")
  parser.add_argument("--convert", nargs=2, metavar=("SOURCE_PTH", "OUT_NPZ"), required=True)
  args = parser.parse_args()
  convert(*args.convert)
  print("wrote", args.convert[1])
