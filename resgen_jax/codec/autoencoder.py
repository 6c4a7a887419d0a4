"""Convolutional encoder / decoder of the RVQ tokenizers, in the RQ-VAE style.

The encoder maps images ``[B, H, W, C]`` in [-1, 1] to latents ``[B, H/f, W/f, d_z]`` with
``f = 2 ** (len(channel_multipliers) - 1)``; the decoder inverts it. The quantizer between
them is pure math (:mod:`resgen_jax.codec.rvq`), not part of these modules.

The modules work on any number of spatial axes: the kernels (3 per axis) and strides follow
the input's rank, so the same code is the speech codec's 1-D autoencoder over mel frames
``[B, F, n_mels] -> [B, F/f, d_z]`` (:mod:`resgen_jax.audio.codec`).

Sizes come from the config: the digits tokenizer is a few thousand parameters, the ImageNet
one (channels 128, multipliers (1, 1, 2, 2, 4, 4), two residual blocks per level) follows
RQ-VAE for 256x256 images on an 8x8 grid.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def downsample_factor(channel_multipliers: Sequence[int]) -> int:
  """Spatial reduction of the encoder: one 2x downsampling between consecutive levels."""
  return 2 ** (len(channel_multipliers) - 1)


KERNEL = 3  # taps per spatial axis of every convolution but the 1x1 skip
# Normalisation layers: "group" (GroupNorm over space and channel groups, RQ-VAE's choice for
# images) or "frame" (LayerNorm over the channels of each position alone), which variable-
# length inputs need: GroupNorm statistics would depend on the whole padded sequence.
NORMS = ("group", "frame")


def normalization(kind: str, groups: int, dtype) -> nn.Module:
  if kind == "group":
    return nn.GroupNorm(num_groups=groups, dtype=dtype)
  if kind == "frame":
    return nn.LayerNorm(dtype=dtype)
  raise ValueError(f"unknown normalisation {kind!r}; known: {NORMS}")


def _kernel(x, size: int = KERNEL):
  """A kernel (or stride) of ``size`` along each spatial axis of ``x [B, *spatial, C]``."""
  return (size,) * (x.ndim - 2)


class ResBlock(nn.Module):
  """Pre-activation residual block: (GroupNorm, swish, conv 3) x 2 with a 1x1 skip."""
  channels: int
  norm_groups: int
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"  # see NORMS

  @nn.compact
  def __call__(self, x):
    h = nn.swish(normalization(self.norm, self.norm_groups, self.dtype)(x))
    h = nn.Conv(self.channels, _kernel(x), dtype=self.dtype)(h)
    h = nn.swish(normalization(self.norm, self.norm_groups, self.dtype)(h))
    h = nn.Conv(self.channels, _kernel(x), dtype=self.dtype)(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, _kernel(x, 1), dtype=self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the spatial grid (RQ-VAE's lowest-resolution block)."""
  norm_groups: int
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"  # see NORMS

  @nn.compact
  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    y = normalization(self.norm, self.norm_groups, self.dtype)(x).reshape(b, -1, c)
    y = nn.SelfAttention(num_heads=1, dtype=self.dtype)(y)
    return x + y.reshape(x.shape)


class Encoder(nn.Module):
  """Images ``[B, H, W, C]`` -> latents ``[B, H/f, W/f, latent_dim]``; any number of
  spatial axes (``[B, F, C] -> [B, F/f, latent_dim]``)."""
  channels: int
  channel_multipliers: Sequence[int]
  num_res_blocks: int
  latent_dim: int
  norm_groups: int
  mid_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"  # see NORMS

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.channels, _kernel(x), dtype=self.dtype)(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_multipliers):
      for _ in range(self.num_res_blocks):
        x = ResBlock(self.channels * mult, self.norm_groups, self.dtype, self.norm)(x)
      if level < len(self.channel_multipliers) - 1:
        x = nn.Conv(self.channels * mult, _kernel(x), strides=_kernel(x, 2),
                    dtype=self.dtype)(x)
    x = ResBlock(x.shape[-1], self.norm_groups, self.dtype, self.norm)(x)
    if self.mid_attention:
      x = AttnBlock(self.norm_groups, self.dtype, self.norm)(x)
    x = ResBlock(x.shape[-1], self.norm_groups, self.dtype, self.norm)(x)
    x = nn.swish(normalization(self.norm, self.norm_groups, self.dtype)(x))
    return nn.Conv(self.latent_dim, _kernel(x), dtype=self.dtype)(x).astype(jnp.float32)


class Decoder(nn.Module):
  """Latents ``[B, h, w, latent_dim]`` -> images ``[B, h*f, w*f, out_channels]`` (unbounded);
  any number of spatial axes."""
  channels: int
  channel_multipliers: Sequence[int]
  num_res_blocks: int
  out_channels: int
  norm_groups: int
  mid_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"  # see NORMS

  @nn.compact
  def __call__(self, z):
    top = self.channels * self.channel_multipliers[-1]
    x = nn.Conv(top, _kernel(z), dtype=self.dtype)(z.astype(self.dtype))
    x = ResBlock(top, self.norm_groups, self.dtype, self.norm)(x)
    if self.mid_attention:
      x = AttnBlock(self.norm_groups, self.dtype, self.norm)(x)
    x = ResBlock(top, self.norm_groups, self.dtype, self.norm)(x)
    for level, mult in reversed(list(enumerate(self.channel_multipliers))):
      for _ in range(self.num_res_blocks):
        x = ResBlock(self.channels * mult, self.norm_groups, self.dtype, self.norm)(x)
      if level > 0:
        doubled = (x.shape[0], *(2 * n for n in x.shape[1:-1]), x.shape[-1])
        x = jax.image.resize(x, doubled, method="nearest")
        x = nn.Conv(x.shape[-1], _kernel(x), dtype=self.dtype)(x)
    x = nn.swish(normalization(self.norm, self.norm_groups, self.dtype)(x))
    return nn.Conv(self.out_channels, _kernel(x), dtype=self.dtype)(x).astype(jnp.float32)


class AutoEncoder(nn.Module):
  """Encoder and decoder under one parameter tree (``encoder``, ``decoder``).

  ``__call__`` runs both (for initialisation); use ``method=AutoEncoder.encode`` /
  ``AutoEncoder.decode`` otherwise.
  """
  channels: int
  channel_multipliers: Sequence[int]
  num_res_blocks: int
  latent_dim: int
  image_channels: int
  norm_groups: int
  mid_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  norm: str = "group"  # see NORMS

  def setup(self):
    common = dict(channels=self.channels, channel_multipliers=tuple(self.channel_multipliers),
                  num_res_blocks=self.num_res_blocks, norm_groups=self.norm_groups,
                  mid_attention=self.mid_attention, dtype=self.dtype, norm=self.norm)
    self.encoder = Encoder(latent_dim=self.latent_dim, **common)
    self.decoder = Decoder(out_channels=self.image_channels, **common)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x))
