"""Optimizer chain from a ``train`` config: AdamW with warmup + cosine decay and clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then cosine decay to ``lr_min_ratio`` of it."""
  if cfg.warmup_steps >= cfg.num_steps:
    raise ValueError(
        f"train.warmup_steps ({cfg.warmup_steps}) must be below train.num_steps "
        f"({cfg.num_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.num_steps, end_value=cfg.learning_rate * cfg.lr_min_ratio)


# Leaf names that weight decay applies to: the weight matrices of dense and convolution
# layers (also when stacked by nn.scan or shaped [width, heads, head]) and embedding tables.
DECAYED_LEAVES = ("kernel", "embedding")


def decay_mask(params):
  """True for leaves named in DECAYED_LEAVES (``*_embedding`` included), by name and not by
  rank: biases (``[heads, head]`` in attention, ``[layers, d]`` under nn.scan), norm scales
  and learned scalars such as a log-sigma are not pulled towards zero."""
  def decayed(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name in DECAYED_LEAVES or name.endswith("_embedding")
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping (if ``grad_clip > 0``) followed by AdamW."""
  if cfg.learning_rate <= 0:
    raise ValueError(f"train.learning_rate must be positive, got {cfg.learning_rate}")
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
