"""The forward process: depth-wise masking of RVQ tokens (method.md section 2).

A token grid is ``[L, D]`` (positions x depths). Masking always hides a *top run of
depths*: position i hides its ``k_i`` finest depths, ``m[i, j] = 1 iff j >= D - k_i``
(0-based), so what stays visible is a prefix of coarse depths. The state of a grid is thus
fully described by the hidden counts ``k [B, L]`` in ``0..D``.

Training draws ``r ~ U[0, 1)``, hides ``n = ceil(gamma(r) * L * D)`` tokens (at least one),
choosing n of the ``L * D`` slots uniformly without replacement and counting per position.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# gamma(r): the fraction of tokens hidden at progress r in [0, 1]; gamma(0) = 1, gamma(1) = 0.
# ``xp`` is jax.numpy in traced code, numpy where the sampler tabulates counts in float64.
SCHEDULES: Dict[str, Callable[..., Array]] = {
    "cosine": lambda r, xp=jnp: xp.cos(0.5 * math.pi * r),
    "linear": lambda r, xp=jnp: 1.0 - r,
    "square": lambda r, xp=jnp: 1.0 - r ** 2,
    "cubic": lambda r, xp=jnp: 1.0 - r ** 3,
    "sqrt": lambda r, xp=jnp: 1.0 - xp.sqrt(r),
}


def schedule(name: str) -> Callable[[Array], Array]:
  """The masking schedule gamma called ``name``."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown mask schedule {name!r}; known: {sorted(SCHEDULES)}")
  return SCHEDULES[name]


def hidden_mask(hidden_counts: Array, depth: int) -> Array:
  """Hidden counts ``k [..., L]`` -> bool mask ``[..., L, D]``, True where hidden."""
  return jnp.arange(depth) >= (depth - hidden_counts)[..., None]


def sample_hidden_counts(rng: Array, valid: Array, depth: int, gamma: Callable,
                         ratio: Optional[Array] = None) -> Array:
  """Draws the training mask of a batch as hidden counts.

  Args:
    rng: PRNG key.
    valid: bool ``[B, L]``, real (non-padding) positions; padding is never hidden.
    depth: D.
    gamma: the masking schedule.
    ratio: optional ``r [B]`` to use instead of drawing ``r ~ U[0, 1)``.

  Returns:
    int32 ``k [B, L]``: each example hides ``n = clip(ceil(gamma(r) * L_valid * D), 1,
    L_valid * D)`` tokens, spread over its valid slots uniformly without replacement.
  """
  batch, length = valid.shape
  ratio_key, slot_key = jax.random.split(rng)
  if ratio is None:
    ratio = jax.random.uniform(ratio_key, (batch,))
  total = jnp.sum(valid, axis=-1) * depth  # [B]
  count = jnp.clip(jnp.ceil(gamma(ratio) * total).astype(jnp.int32), 1, total)
  # A uniformly random ranking of the valid slots; the n best-ranked are hidden.
  keys = jax.random.uniform(slot_key, (batch, length, depth))
  keys = jnp.where(valid[..., None], keys, jnp.inf).reshape(batch, -1)
  rank = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)
  chosen = (rank < count[:, None]).reshape(batch, length, depth)
  return jnp.sum(chosen, axis=-1).astype(jnp.int32)


def split_embeddings(embeddings: Array, hidden_counts: Array):
  """Visible-prefix and hidden-tail sums of per-depth embeddings.

  Args:
    embeddings: ``[B, L, D, d]`` per-depth embeddings ``e_j(x[i, j])``.
    hidden_counts: ``k [B, L]``.

  Returns:
    ``(visible_sum, hidden_sum)``, each ``[B, L, d]``: the network input
    ``sum_{j < D-k} e_j`` and the training target ``sum_{j >= D-k} e_j``.
  """
  mask = hidden_mask(hidden_counts, embeddings.shape[-2])[..., None]
  return (jnp.sum(jnp.where(mask, 0.0, embeddings), axis=-2),
          jnp.sum(jnp.where(mask, embeddings, 0.0), axis=-2))
