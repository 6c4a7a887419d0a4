"""The direct-token baseline (``generator.family="direct"``): ResGen without the mixture.

Everything ResGen does except the output: the same masked transformer input (visible
prefix sums, hidden counts, adaLN class conditioning), the same depth-wise masking
schedule in training, and the same unmasking schedule and confidence rule in sampling
(:func:`sampler.unmask`). The head is a softmax over the V codes of every depth
(``head="tokens"``, MaskGIT-style), trained by cross-entropy on the hidden tokens only; in
sampling each hidden token is drawn on its own, so the tokens of one position revealed in
the same step do not see each other, where ResGen draws them jointly from one mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.generator import masking, sampler
from resgen_jax.generator.task import GeneratorTask, token_nll


def token_cross_entropy(logits: jax.Array, codes: jax.Array, weights: jax.Array):
  """Mean cross-entropy of ``codes`` int ``[B, L, D]`` under ``logits [B, L, D, V]`` over
  the slots where ``weights [B, L, D]`` (0/1) is set, and the accuracy of the argmax there.
  -> ``(loss, accuracy)`` scalars (0 when no slot is weighted)."""
  nll, correct = token_nll(logits.astype(jnp.float32), codes)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(nll * weights) / count, jnp.sum(correct.astype(jnp.float32) * weights) / count


class DirectTokenTask(GeneratorTask):
  """The masked backbone of :class:`GeneratorTask` with a softmax per hidden depth."""

  def __init__(self, cfg: ml_collections.ConfigDict, codebooks: np.ndarray,
               num_positions: int, depth: int, num_classes: int):
    super().__init__(cfg, codebooks, num_positions, depth, num_classes)
    self.model = self.model.clone(head="tokens", codebook_size=codebooks.shape[1])

  def init(self, rng, batch):
    codes, labels, valid = self.flatten(batch)
    visible = jnp.zeros(codes.shape[:2] + (self.codebooks.shape[-1],))
    params = {"model": self.model.init(rng, visible, jnp.zeros(codes.shape[:2], jnp.int32),
                                       labels, valid)["params"]}
    return params, {}

  def data_init(self, params, model_state, batch, rng):
    del params, batch, rng
    return model_state  # no target normalisation: the targets are tokens

  def losses(self, params, model_state, constants, batch, rng, train: bool):
    """Cross-entropy of the hidden tokens of one batch, masks drawn from ``rng``."""
    del model_state
    m = self.masked_batch(constants, batch, rng, train)
    valid, hidden = m["valid"], m["hidden"]
    logits = self.model.apply({"params": params["model"]}, m["visible"], hidden, m["labels"],
                              valid, train=train, rngs={"dropout": m["dropout_key"]})
    weights = (masking.hidden_mask(hidden, self.depth) & valid[..., None]).astype(jnp.float32)
    loss, accuracy = token_cross_entropy(logits, m["codes"], weights)
    return loss, {"nll": loss, "accuracy": accuracy,
                  "mask_ratio": jnp.sum(hidden) / (jnp.sum(valid) * self.depth)}

  def network_fn(self, params, model_state, codebooks, labels, valid, text=None, dtype=""):
    """The sampler's ``(codes, hidden, conditional) -> logits [B, L, D, V]`` (``dtype``:
    :meth:`sampling_model`)."""
    del model_state
    model = self.sampling_model(dtype)
    if text is not None:
      raise ValueError("the direct-token baseline is not text-conditioned")
    null = jnp.full_like(labels, self.null_class)

    def network(codes, hidden, conditional):
      visible, _ = masking.split_embeddings(rvq.embed(codes, codebooks), hidden)
      return model.apply({"params": params["model"]}, visible, hidden,
                         labels if conditional else null, valid)

    return network

  def proposal(self, params, model_state, codebooks, labels, valid, text, scfg):
    """A token per hidden slot from its softmax; ResGen's schedule does the rest."""
    return sampler.token_proposal(self.network_fn(
        params, model_state, codebooks, labels, valid, text, scfg.get("dtype", "")), scfg)
