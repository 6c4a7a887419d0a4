"""Stage 2: trains the ResGen generator on cached RVQ tokens with the shared trainer.

A batch is ``{"codes": int [B, ..., D], "label": int [B]}`` (images: ``[B, h, w, D]``,
flattened to ``L = h*w`` positions) with an optional ``"valid": bool [B, L]`` padding mask
for variable-length sequences. The tokenizer's codebooks are a frozen input (``constants``).

Per step: draw the depth-wise mask as hidden counts ``k`` (masking.py), embed the tokens,
feed the visible prefix sums, and fit the mixture head to the hidden sums (the targets) at
positions with ``k > 0``; the class is replaced by the null class with probability
``loss.cond_dropout``. Targets are optionally divided by their RMS for each hidden count
(``loss.target_norm``), measured once on the first batch and kept in ``model_state``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.generator import masking, mixture, sampler
from resgen_jax.generator.model import ResGenTransformer, block_class
from resgen_jax.train.task import Task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EVAL_MASK_SEED = 1234  # evaluation draws the same masks every time, so evals compare


def flatten_tokens(batch: dict, depth: int):
  """``(codes int32 [B, L, D], labels int32 [B], valid bool [B, L])`` from a token batch
  (codes ``[B, ..., D]``; ``valid_positions`` marks the real positions of padded
  sequences, all real without it). Raises a ValueError if the codes are not ``depth`` deep."""
  codes = batch["codes"]
  if codes.shape[-1] != depth:
    raise ValueError(f"token codes have depth {codes.shape[-1]}, the generator expects "
                     f"{depth}")
  codes = codes.reshape(codes.shape[0], -1, depth).astype(jnp.int32)
  valid = batch.get("valid_positions")
  valid = jnp.ones(codes.shape[:2], bool) if valid is None else valid
  return codes, batch["label"].astype(jnp.int32), valid


class TokenTask(Task):
  """What every generator family shares: the grid ``[L, D]`` of RVQ tokens with frozen
  codebooks (a constant of every step), ``num_classes`` classes plus the null class, and
  token batches (:func:`flatten_tokens`). Validates the settings all families read."""

  name = "generator"  # every family is the generator stage (same checkpoints and CLI)

  def __init__(self, cfg: ml_collections.ConfigDict, codebooks: np.ndarray,
               num_positions: int, depth: int, num_classes: int):
    if not 0.0 <= cfg.loss.cond_dropout < 1.0:
      raise ValueError(f"generator.loss.cond_dropout must be in [0, 1), got "
                       f"{cfg.loss.cond_dropout}")
    if cfg.model.dtype not in DTYPES:
      raise ValueError(f"generator.model.dtype must be one of {sorted(DTYPES)}, got "
                       f"{cfg.model.dtype!r}")
    self.cfg = cfg
    self.codebooks = jnp.asarray(codebooks, jnp.float32)
    self.num_positions, self.depth, self.num_classes = num_positions, depth, num_classes

  @property
  def null_class(self) -> int:
    return self.num_classes

  def constants(self):
    return {"codebooks": self.codebooks}

  def flatten(self, batch: dict):
    """``(codes [B, L, D], labels [B], valid [B, L])`` (see :func:`flatten_tokens`)."""
    return flatten_tokens(batch, self.depth)


class GeneratorTask(TokenTask):
  """ResGen over token grids ``[L, D]`` with ``num_classes`` classes."""

  def __init__(self, cfg: ml_collections.ConfigDict, codebooks: np.ndarray,
               num_positions: int, depth: int, num_classes: int):
    super().__init__(cfg, codebooks, num_positions, depth, num_classes)
    m, loss = cfg.model, cfg.loss
    if loss.kind not in mixture.LOSSES:
      raise ValueError(f"generator.loss.kind must be one of {mixture.LOSSES}, got {loss.kind!r}")
    if loss.sigma <= 0:
      raise ValueError(f"generator.loss.sigma must be positive, got {loss.sigma}")
    masking.schedule(loss.schedule)  # validates the name
    self.model = ResGenTransformer(
        num_positions=num_positions, token_depth=depth, latent_dim=codebooks.shape[-1],
        num_classes=num_classes, width=m.width, num_layers=m.num_layers,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_components=m.num_components,
        low_rank=m.low_rank, dropout=m.dropout, remat=m.remat,
        remat_policy=m.remat_policy, scan_layers=m.scan_layers, dtype=DTYPES[m.dtype])
    block_class(m.remat, m.remat_policy)  # validates the policy name

  def init(self, rng, batch):
    codes, labels, valid = self.flatten(batch)
    visible = jnp.zeros(codes.shape[:2] + (self.codebooks.shape[-1],))
    params = {"model": self.model.init(rng, visible, jnp.zeros(codes.shape[:2], jnp.int32),
                                       labels, valid)["params"]}
    if self.cfg.loss.learn_sigma:
      params["log_sigma"] = jnp.asarray(math.log(self.cfg.loss.sigma), jnp.float32)
    return params, {"target_rms": jnp.ones((self.depth + 1,), jnp.float32)}

  def data_init(self, params, model_state, batch, rng):
    """RMS of the hidden sum for every hidden count k = 1..D over the first batch."""
    del params, rng
    if not self.cfg.loss.target_norm:
      return model_state
    codes, _, valid = self.flatten(batch)
    emb = rvq.embed(codes, self.codebooks)  # [B, L, D, d]
    tails = jnp.cumsum(emb[..., ::-1, :], axis=-2)  # tails[..., k-1, :] = top-k sum
    weight = valid[..., None, None].astype(jnp.float32)
    mean_sq = jnp.sum(jnp.square(tails) * weight, axis=(0, 1, 3)) / (
        jnp.sum(weight) * emb.shape[-1])
    rms = jnp.sqrt(jnp.maximum(mean_sq, 1e-12))
    return {"target_rms": jnp.concatenate([jnp.ones((1,)), rms])}

  def log_sigma(self, params) -> jax.Array:
    return params.get("log_sigma", jnp.asarray(math.log(self.cfg.loss.sigma), jnp.float32))

  def masked_batch(self, constants, batch, rng, train: bool) -> dict:
    """The training view of a batch: a mask drawn from ``rng`` (split in three: mask, class
    dropout, network dropout) -> ``codes [B,L,D]``, ``labels [B]`` (the null class with
    probability ``loss.cond_dropout`` when ``train``), ``valid [B,L]``, ``hidden [B,L]``,
    the network input ``visible [B,L,d]``, the hidden sums ``target [B,L,d]`` and the
    network's ``dropout_key``. Shared by every family on the masked backbone."""
    codes, labels, valid = self.flatten(batch)
    mask_key, drop_key, dropout_key = jax.random.split(rng, 3)
    hidden = masking.sample_hidden_counts(mask_key, valid, self.depth,
                                          masking.schedule(self.cfg.loss.schedule))
    visible, target = masking.split_embeddings(rvq.embed(codes, constants["codebooks"]), hidden)
    if train:
      dropped = jax.random.bernoulli(drop_key, self.cfg.loss.cond_dropout, labels.shape)
      labels = jnp.where(dropped, self.null_class, labels)
    return dict(codes=codes, labels=labels, valid=valid, hidden=hidden, visible=visible,
                target=target, dropout_key=dropout_key)

  def losses(self, params, model_state, constants, batch, rng, train: bool):
    """Loss terms and metrics of one batch with masks drawn from ``rng``."""
    loss_cfg = self.cfg.loss
    m = self.masked_batch(constants, batch, rng, train)
    valid, hidden, dropout_key = m["valid"], m["hidden"], m["dropout_key"]
    visible, labels = m["visible"], m["labels"]
    target = m["target"] / model_state["target_rms"][hidden][..., None]
    logits, means = self.model.apply({"params": params["model"]}, visible, hidden, labels,
                                     valid, train=train, rngs={"dropout": dropout_key})
    weights = ((hidden > 0) & valid).astype(jnp.float32)
    log_sigma = self.log_sigma(params)
    terms = mixture.jensen_losses(target, logits, means, log_sigma, weights,
                                  loss_cfg.learn_sigma)
    nll = mixture.mixture_nll(target, logits, means, log_sigma, weights)
    loss = terms["cls"] + terms["reg"] if loss_cfg.kind == "jensen" else nll
    metrics = {"cls": terms["cls"], "reg": terms["reg"], "nll": nll,
               "mixture_entropy": mixture.usage_entropy(logits, weights),
               "mask_ratio": jnp.sum(hidden) / (jnp.sum(valid) * self.depth),
               "sigma": jnp.exp(log_sigma)}
    return loss, metrics

  def loss_and_grads(self, params, model_state, constants, batch, rng, step):
    del step
    (loss, metrics), grads = jax.value_and_grad(self.losses, has_aux=True)(
        params, model_state, constants, batch, rng, True)
    return loss, grads, model_state, metrics

  def eval_step(self, params, model_state, constants, batch):
    valid = batch["valid"].astype(jnp.float32)
    per_example = jax.vmap(
        lambda b, key: self.losses(params, model_state, constants,
                                   jax.tree.map(lambda x: x[None], b), key, False),
    )
    keys = jax.random.split(jax.random.key(EVAL_MASK_SEED), valid.shape[0])
    example_batch = {k: v for k, v in batch.items() if k != "valid"}
    loss, metrics = per_example(example_batch, keys)
    sums = {k: jnp.sum(v * valid) for k, v in dict(metrics, loss=loss).items()}
    sums["count"] = jnp.sum(valid)
    return sums

  def network_fn(self, params, model_state, codebooks, labels: jax.Array,
                 valid: jax.Array) -> Callable:
    """The sampler's ``(codes, hidden, conditional) -> (logits, means)`` for these labels;
    means are returned in embedding units (target normalisation undone)."""
    null = jnp.full_like(labels, self.null_class)

    def network(codes, hidden, conditional):
      visible, _ = masking.split_embeddings(rvq.embed(codes, codebooks), hidden)
      logits, means = self.model.apply({"params": params["model"]}, visible, hidden,
                                       labels if conditional else null, valid)
      return logits, means * model_state["target_rms"][hidden][..., None, None]

    return network

  def sample_codes(self, params, model_state, codebooks, labels: jax.Array, rng: jax.Array,
                   scfg: ml_collections.ConfigDict) -> jax.Array:
    """Class-conditional samples: labels ``[B]`` -> every token, int32 ``[B, L, D]``, in
    ``scfg.steps`` network calls (:func:`sampler.unmask` around :meth:`proposal`). The
    interface every generator family shares (the pipeline, sweeps and benchmarks call only
    this)."""
    start = jnp.zeros((labels.shape[0], self.num_positions, self.depth), jnp.int32)
    network = self.network_fn(params, model_state, codebooks, labels,
                              jnp.ones(start.shape[:2], bool))
    return sampler.unmask(self.proposal(network, codebooks, scfg), start,
                          jnp.zeros(start.shape, bool), rng, scfg).codes

  def proposal(self, network, codebooks, scfg):
    """The sampler's proposal for this model's ``network_fn``: ResGen's mixture."""
    return sampler.mixture_proposal(network, codebooks, scfg)
