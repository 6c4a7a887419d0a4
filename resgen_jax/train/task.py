"""What a training stage must provide to the shared trainer.

Every stage (the tokenizer; later the generator and the baselines) is a :class:`Task`. The
trainer owns the loop, the optimizer, sharding, checkpoints, logging and resumption; the
task owns the model and its math. All methods are pure functions of their arguments so the
trainer can jit them.

Shapes: ``batch`` is a dict of global arrays whose leading axis is the global batch.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Tuple

import jax

PyTree = Any
Metrics = Dict[str, jax.Array]


class Task(abc.ABC):
  """A trainable stage."""

  #: Stage name: the sub-directory of the workdir and the ``stage`` field in metrics.jsonl.
  name: str

  #: Top-level ``params`` entries only training uses (e.g. a GAN discriminator): loading a
  #: trained stage for inference (:func:`trainer.load_trained_state`) does not read them.
  training_only_params: Tuple[str, ...] = ()

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict) -> Tuple[PyTree, PyTree]:
    """Returns ``(params, model_state)`` for an example batch.

    ``params`` is what the optimizer updates; ``model_state`` holds everything else that
    evolves and must be checkpointed (e.g. EMA codebooks).
    """

  def constants(self) -> PyTree:
    """Frozen inputs of every step that are not checkpointed (e.g. a perceptual network's
    weights loaded from a user file). Passed as an argument, never baked into the graph."""
    return {}

  def data_init(self, params: PyTree, model_state: PyTree, batch: dict,
                rng: jax.Array) -> PyTree:
    """Data-dependent initialisation of ``model_state`` on the first batch of a fresh run
    (e.g. k-means codebooks). Default: unchanged."""
    del params, batch, rng
    return model_state

  @abc.abstractmethod
  def loss_and_grads(self, params: PyTree, model_state: PyTree, constants: PyTree,
                     batch: dict, rng: jax.Array,
                     step: jax.Array) -> Tuple[jax.Array, PyTree, PyTree, Metrics]:
    """One step's ``(loss, grads, new_model_state, metrics)``; metrics are scalars."""

  @abc.abstractmethod
  def eval_step(self, params: PyTree, model_state: PyTree, constants: PyTree,
                batch: dict) -> Metrics:
    """Per-batch *sums* of evaluation metrics over the examples with ``batch['valid']``,
    plus ``'count'``; the trainer divides by the total count."""
