"""The mixture-of-Gaussians output and its losses (method.md section 4).

Per position the head gives logits ``pi [.., K]`` and means ``mu [.., K, d]`` of a mixture of
K isotropic Gaussians with standard deviation sigma over the hidden-embedding sum.

Default loss, the Jensen-bound split the paper trains:

    q_k   = stop_grad softmax_k(-||t - mu_k||^2 / (2 sigma^2))
    L_cls = -sum_k q_k log pi_k
    L_reg =  sum_k q_k ||t - mu_k||^2 / (2 sigma^2)     (+ d log sigma when sigma is learned)

Option: the exact mixture negative log-likelihood
``-log sum_k pi_k N(t; mu_k, sigma^2 I)``. Both average over the positions with weight > 0.
``log_sigma`` is a scalar or one value per position (``[B, L]``, e.g. a learned sigma for
each hidden count).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
LOSSES = ("jensen", "nll")


def squared_distances(target: Array, means: Array) -> Array:
  """``||t - mu_k||^2``: target ``[..., d]``, means ``[..., K, d]`` -> ``[..., K]``."""
  return jnp.sum(jnp.square(target[..., None, :] - means), axis=-1)


def weighted_mean(values: Array, weights: Array) -> Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def jensen_losses(target: Array, logits: Array, means: Array, log_sigma: Array,
                  weights: Array, learned_sigma: bool) -> dict:
  """``{"cls", "reg"}`` averaged over positions. target ``[B,L,d]``, logits ``[B,L,K]``,
  means ``[B,L,K,d]``, weights ``[B,L]`` (1 where the position has hidden tokens)."""
  log_sigma = jnp.asarray(log_sigma)
  scaled = squared_distances(target, means) / (2.0 * jnp.exp(2.0 * log_sigma[..., None]))
  q = jax.lax.stop_gradient(jax.nn.softmax(-scaled, axis=-1))
  cls = -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  reg = jnp.sum(q * scaled, axis=-1)
  if learned_sigma:
    reg = reg + target.shape[-1] * log_sigma
  return {"cls": weighted_mean(cls, weights), "reg": weighted_mean(reg, weights)}


def position_nll(target: Array, logits: Array, means: Array, log_sigma: Array) -> Array:
  """Exact ``-log p(t)`` of the mixture at every position (nats): ``[B, L]``."""
  dim = target.shape[-1]
  log_sigma = jnp.asarray(log_sigma)[..., None]
  log_normal = (-squared_distances(target, means) / (2.0 * jnp.exp(2.0 * log_sigma))
                - dim * log_sigma - 0.5 * dim * math.log(2.0 * math.pi))
  return -jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + log_normal, axis=-1)


def mixture_nll(target: Array, logits: Array, means: Array, log_sigma: Array,
                weights: Array) -> Array:
  """Exact ``-log p(t)`` of the mixture, averaged over positions (nats per position)."""
  return weighted_mean(position_nll(target, logits, means, log_sigma), weights)


def nll_by_count(nll: Array, hidden: Array, weights: Array, depth: int) -> Array:
  """Mean of the per-position ``nll [B, L]`` over the weighted positions that hide ``k``
  tokens, for k = 1..D -> ``[D]`` (0 where no position hides k): where the loss goes."""
  onehot = (hidden[..., None] == jnp.arange(1, depth + 1)) * weights[..., None]
  return jnp.sum(nll[..., None] * onehot, axis=(0, 1)) / jnp.maximum(
      jnp.sum(onehot, axis=(0, 1)), 1.0)


def usage_entropy(logits: Array, weights: Array) -> Array:
  """Entropy (nats) of the average component weights over the weighted positions: how
  many components the model uses (``log K`` when all equally)."""
  probs = jax.nn.softmax(logits, axis=-1)
  mean = jnp.sum(probs * weights[..., None], axis=(0, 1)) / jnp.maximum(jnp.sum(weights), 1.0)
  return -jnp.sum(jnp.where(mean > 0, mean * jnp.log(jnp.where(mean > 0, mean, 1.0)), 0.0))
