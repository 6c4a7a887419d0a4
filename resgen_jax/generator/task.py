"""Stage 2: trains the ResGen generator on cached RVQ tokens with the shared trainer.

A batch is ``{"codes": int [B, ..., D], "label": int [B]}`` (images: ``[B, h, w, D]``,
flattened to ``L = h*w`` positions) with an optional ``"valid_positions": bool [B, L]``
padding mask for variable-length sequences (speech) and, for a text-conditioned model, the
transcript ``"text": int [B, S]`` (``layers.TEXT_PAD`` padding). The tokenizer's codebooks
are a frozen input (``constants``).

Per step: draw the depth-wise mask as hidden counts ``k`` (masking.py), embed the tokens,
feed the visible prefix sums, and fit the mixture head to the hidden sums (the targets) at
positions with ``k > 0``; the class is replaced by the null class with probability
``loss.cond_dropout`` (and the text by the null text, ``NULL_TEXT`` alone). Targets are
optionally divided by their RMS for each hidden count (``loss.target_norm``), measured once
on the first batch and kept in ``model_state``.

Prompts (speech): with probability ``loss.prompt_prob`` an example keeps a random prefix of
up to ``loss.prompt_max_fraction`` of its positions wholly visible, never masked and never
scored, as a speech prompt is at synthesis time (our default; the method leaves how
prompts are trained open).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.generator import masking, mixture, sampler
from resgen_jax.generator.model import ResGenTransformer
from resgen_jax.layers import DTYPES, NULL_TEXT, TEXT_MODES, block_class
from resgen_jax.train.task import Task

EVAL_MASK_SEED = 1234  # evaluation draws the same masks every time, so evals compare
POSITION_WEIGHTS = ("position", "tokens")  # generator.loss.position_weight


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


def loss_position_weights(rule: str, hidden: jax.Array, scored: jax.Array) -> jax.Array:
  """Each position's weight in the loss ``[B, L]``: ``scored`` (1 where it has hidden
  tokens) for ``"position"``, times its hidden count ``hidden [B, L]`` for ``"tokens"``."""
  return scored * hidden.astype(scored.dtype) if rule == "tokens" else scored


def token_nll(logits: jax.Array, codes: jax.Array):
  """``(-log p(code), code is the most probable)``: logits ``[..., V]``, codes ``[...]``."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, codes[..., None], axis=-1)[..., 0]
  return nll, jnp.argmax(logits, axis=-1) == codes


def check_generator_model(cfg: ml_collections.ConfigDict) -> None:
  """The generator's shape (``generator.model``), which every family reads."""
  m = cfg.model
  for f in ("width", "num_layers", "num_heads", "mlp_ratio", "num_components", "low_rank"):
    if m[f] < 1:
      raise ValueError(f"generator.model.{f} must be >= 1, got {m[f]}")
  if m.width % m.num_heads:
    raise ValueError(f"generator.model.width ({m.width}) must be a multiple of "
                     f"generator.model.num_heads ({m.num_heads})")
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"generator.model.dropout must be in [0, 1), got {m.dropout}")
  if cfg.token_depth < 0:
    raise ValueError(f"generator.token_depth must be >= 0 (0: every cached depth), got "
                     f"{cfg.token_depth}")


def null_text(text: jax.Array) -> jax.Array:
  """The unconditional text of a batch's shape ``[B, S]``: ``NULL_TEXT`` then padding."""
  return jnp.zeros_like(text).at[:, 0].set(NULL_TEXT)


def prompt_positions(rng: jax.Array, valid: jax.Array, prob: float,
                     max_fraction: float) -> jax.Array:
  """Training prompts: bool ``[B, L]``, a prefix of ``floor(u * max_fraction * L_valid)``
  positions (``u ~ U[0, 1)``) for an example drawn with probability ``prob``, else none."""
  use_key, length_key = jax.random.split(rng)
  lengths = jnp.floor(jax.random.uniform(length_key, valid.shape[:1]) * max_fraction *
                      jnp.sum(valid, axis=-1)).astype(jnp.int32)
  lengths = jnp.where(jax.random.bernoulli(use_key, prob, lengths.shape), lengths, 0)
  return jnp.arange(valid.shape[1]) < lengths[:, None]


class TokenTask(Task):
  """What every generator family shares: the grid ``[L, D]`` of RVQ tokens with frozen
  codebooks (a constant of every step), ``num_classes`` classes plus the null class, and
  token batches (:func:`flatten_tokens`). Validates the settings all families read."""

  name = "generator"  # every family is the generator stage (same checkpoints and CLI)

  def __init__(self, cfg: ml_collections.ConfigDict, codebooks: np.ndarray,
               num_positions: int, depth: int, num_classes: int):
    check_generator_model(cfg)
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

  def sampling_model(self, dtype: str = ""):
    """The network computing in ``dtype`` (``sampler.dtype``; "" keeps the trained one).
    Parameters stay float32 either way, so a float32-trained checkpoint samples in bf16."""
    return self.model if not dtype else self.model.clone(dtype=DTYPES[dtype])

  def sample_tokens(self, params, model_state, codebooks, labels: jax.Array, rng: jax.Array,
                    scfg: ml_collections.ConfigDict) -> sampler.SampleOutput:
    """Class-conditional samples with their reveal history: labels ``[B]`` ->
    ``SampleOutput(codes [B, L, D], reveal_step [B, L, D])``, ``reveal_step`` the network
    call (1-based) that drew each token. The interface every generator family shares (the
    pipeline, the Python API, sweeps and benchmarks call only this and
    :meth:`sample_codes`)."""
    raise NotImplementedError

  def sample_codes(self, params, model_state, codebooks, labels: jax.Array, rng: jax.Array,
                   scfg: ml_collections.ConfigDict) -> jax.Array:
    """:meth:`sample_tokens`' codes alone, int32 ``[B, L, D]``."""
    return self.sample_tokens(params, model_state, codebooks, labels, rng, scfg).codes


class GeneratorTask(TokenTask):
  """ResGen over token grids ``[L, D]`` with ``num_classes`` classes."""

  def __init__(self, cfg: ml_collections.ConfigDict, codebooks: np.ndarray,
               num_positions: int, depth: int, num_classes: int, text_vocab_size: int = 0,
               max_text_length: int = 0):
    """``text_vocab_size > 0`` conditions the model on text of up to ``max_text_length``
    tokens (``generator.model.text_mode``, ``text_layers``)."""
    super().__init__(cfg, codebooks, num_positions, depth, num_classes)
    m, loss = cfg.model, cfg.loss
    if loss.kind not in mixture.LOSSES:
      raise ValueError(f"generator.loss.kind must be one of {mixture.LOSSES}, got {loss.kind!r}")
    if loss.sigma <= 0:
      raise ValueError(f"generator.loss.sigma must be positive, got {loss.sigma}")
    if loss.sigma_per_count and not loss.learn_sigma:
      raise ValueError("generator.loss.sigma_per_count=True learns one sigma per hidden "
                       "count: it needs generator.loss.learn_sigma=True")
    if not (0.0 <= loss.prompt_prob <= 1.0 and 0.0 <= loss.prompt_max_fraction < 1.0):
      raise ValueError(f"generator.loss.prompt_prob must be in [0, 1] and prompt_max_fraction "
                       f"in [0, 1), got {loss.prompt_prob} and {loss.prompt_max_fraction}")
    if text_vocab_size and m.text_mode not in TEXT_MODES:
      raise ValueError(f"generator.model.text_mode must be one of {TEXT_MODES}, got "
                       f"{m.text_mode!r}")
    if loss.position_weight not in POSITION_WEIGHTS:
      raise ValueError(f"generator.loss.position_weight must be one of {POSITION_WEIGHTS}, "
                       f"got {loss.position_weight!r}")
    masking.schedule(loss.schedule)  # validates the name
    self.text_vocab_size, self.max_text_length = text_vocab_size, max_text_length
    self.model = ResGenTransformer(
        num_positions=num_positions, token_depth=depth, latent_dim=codebooks.shape[-1],
        num_classes=num_classes, width=m.width, num_layers=m.num_layers,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_components=m.num_components,
        low_rank=m.low_rank, dropout=m.dropout, remat=m.remat,
        remat_policy=m.remat_policy, scan_layers=m.scan_layers, dtype=DTYPES[m.dtype],
        text_vocab_size=text_vocab_size, max_text_length=max_text_length,
        text_layers=m.text_layers, text_mode=m.text_mode)
    block_class(m.remat, m.remat_policy)  # validates the policy name

  def text(self, batch: dict):
    """The batch's text tokens ``[B, S]`` for a text-conditioned model, else None."""
    if not self.text_vocab_size:
      return None
    if "text" not in batch:
      raise ValueError("a text-conditioned generator needs 'text' [B, S] in its batches")
    return batch["text"].astype(jnp.int32)

  def init(self, rng, batch):
    codes, labels, valid = self.flatten(batch)
    visible = jnp.zeros(codes.shape[:2] + (self.codebooks.shape[-1],))
    params = {"model": self.model.init(rng, visible, jnp.zeros(codes.shape[:2], jnp.int32),
                                       labels, valid, text=self.text(batch))["params"]}
    if self.cfg.loss.learn_sigma:
      shape = (self.depth + 1,) if self.cfg.loss.sigma_per_count else ()
      params["log_sigma"] = jnp.full(shape, math.log(self.cfg.loss.sigma), jnp.float32)
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
    """log sigma in normalised target units: a scalar, or ``[D + 1]`` (one per hidden count,
    ``loss.sigma_per_count``; entry 0 is unused)."""
    return params.get("log_sigma", jnp.asarray(math.log(self.cfg.loss.sigma), jnp.float32))

  def position_log_sigma(self, params, hidden: jax.Array) -> jax.Array:
    """log sigma of every position's mixture, in normalised target units: ``[B, L]``."""
    log_sigma = self.log_sigma(params)
    return log_sigma[hidden] if log_sigma.ndim else jnp.broadcast_to(log_sigma, hidden.shape)

  def embedding_sigma(self, params, model_state, hidden: jax.Array) -> jax.Array:
    """Every position's mixture sigma in embedding units (target normalisation undone):
    ``[B, L]``, the scale of the sampler's ``mixture`` confidence."""
    return (jnp.exp(self.position_log_sigma(params, hidden))
            * model_state["target_rms"][hidden])

  def masked_batch(self, constants, batch, rng, train: bool) -> dict:
    """The training view of a batch: a mask drawn from ``rng`` (split in three: mask, class
    dropout, network dropout; training prompts from ``fold_in(rng, 3)``) -> ``codes
    [B,L,D]``, ``labels [B]`` (the null class with probability ``loss.cond_dropout`` when
    ``train``; for text models the text goes with it), ``valid [B,L]``, ``hidden [B,L]``,
    the network input ``visible [B,L,d]``, the hidden sums ``target [B,L,d]`` and the
    network's ``dropout_key``. Shared by every family on the masked backbone."""
    loss_cfg = self.cfg.loss
    codes, labels, valid = self.flatten(batch)
    text = self.text(batch)
    mask_key, drop_key, dropout_key = jax.random.split(rng, 3)
    prompt_key = jax.random.fold_in(rng, 3)  # apart, so runs without prompts keep their masks
    maskable = valid
    if loss_cfg.prompt_prob > 0:
      maskable = valid & ~prompt_positions(prompt_key, valid, loss_cfg.prompt_prob,
                                           loss_cfg.prompt_max_fraction)
    hidden = masking.sample_hidden_counts(mask_key, maskable, self.depth,
                                          masking.schedule(loss_cfg.schedule))
    visible, target = masking.split_embeddings(rvq.embed(codes, constants["codebooks"]), hidden)
    if train:
      dropped = jax.random.bernoulli(drop_key, loss_cfg.cond_dropout, labels.shape)
      labels = jnp.where(dropped, self.null_class, labels)
      if text is not None:
        text = jnp.where(dropped[:, None], null_text(text), text)
    return dict(codes=codes, labels=labels, valid=valid, hidden=hidden, visible=visible,
                target=target, dropout_key=dropout_key, text=text)

  def losses(self, params, model_state, constants, batch, rng, train: bool):
    """Loss terms and metrics of one batch with masks drawn from ``rng``."""
    loss_cfg = self.cfg.loss
    m = self.masked_batch(constants, batch, rng, train)
    valid, hidden, dropout_key = m["valid"], m["hidden"], m["dropout_key"]
    visible, labels = m["visible"], m["labels"]
    target = m["target"] / model_state["target_rms"][hidden][..., None]
    logits, means = self.model.apply({"params": params["model"]}, visible, hidden, labels,
                                     valid, train=train, text=m["text"],
                                     rngs={"dropout": dropout_key})
    weights = ((hidden > 0) & valid).astype(jnp.float32)
    loss_weights = loss_position_weights(loss_cfg.position_weight, hidden, weights)
    log_sigma = self.position_log_sigma(params, hidden)
    terms = mixture.jensen_losses(target, logits, means, log_sigma, loss_weights,
                                  loss_cfg.learn_sigma)
    position_nll = mixture.position_nll(target, logits, means, log_sigma)
    nll = mixture.weighted_mean(position_nll, weights)  # per scored position, whatever weights
    loss = (terms["cls"] + terms["reg"] if loss_cfg.kind == "jensen"
            else mixture.weighted_mean(position_nll, loss_weights))
    metrics = {"cls": terms["cls"], "reg": terms["reg"], "nll": nll,
               "mixture_entropy": mixture.usage_entropy(logits, weights),
               "mask_ratio": jnp.sum(hidden) / (jnp.sum(valid) * self.depth)}
    # Where the loss goes and what sigma each hidden count has learned (k = 1..D).
    by_count = mixture.nll_by_count(position_nll, hidden, weights, self.depth)
    sigma = jnp.broadcast_to(jnp.exp(self.log_sigma(params)), (self.depth + 1,))
    for k in range(1, self.depth + 1):
      metrics[f"nll_k{k}"] = by_count[k - 1]
      if loss_cfg.sigma_per_count:
        metrics[f"sigma_k{k}"] = sigma[k]
    metrics["sigma"] = jnp.mean(sigma[1:])
    return loss, metrics

  def loss_and_grads(self, params, model_state, constants, batch, rng, step):
    del step
    (loss, metrics), grads = jax.value_and_grad(self.losses, has_aux=True)(
        params, model_state, constants, batch, rng, True)
    return loss, grads, model_state, metrics

  def requantization_matches(self, params, model_state, constants, batch, rng) -> dict:
    """How often re-quantizing the predicted hidden sum gives back the data's tokens, under
    training masks drawn from ``rng``: the most probable component's mean (embedding units)
    is quantized from each position's first hidden depth. -> counts (sum over the batch)
    ``first_hit [D]`` / ``first_count [D]`` at the first hidden depth by hidden count k =
    1..D, and ``depth_hit [D]`` / ``depth_count [D]`` over every hidden slot by depth."""
    m = self.masked_batch(constants, batch, rng, train=False)
    hidden, codes, valid = m["hidden"], m["codes"], m["valid"]
    logits, means = self.model.apply({"params": params["model"]}, m["visible"], hidden,
                                     m["labels"], valid, text=m["text"])
    best = jnp.take_along_axis(means, jnp.argmax(logits, -1)[..., None, None], axis=-2)
    best = best[..., 0, :] * model_state["target_rms"][hidden][..., None]
    proposed = rvq.quantize(best, constants["codebooks"], depth=self.depth,
                            start_depth=self.depth - hidden).codes
    slots = masking.hidden_mask(hidden, self.depth) & valid[..., None]
    hit = (proposed == codes) & slots
    first = jnp.arange(self.depth) == (self.depth - hidden)[..., None]  # [B, L, D]
    by_k = (hidden[..., None] == jnp.arange(1, self.depth + 1)) & valid[..., None]
    first_hit = jnp.sum(hit & first, axis=-1)  # [B, L]: 0/1
    return {"first_hit": jnp.sum(by_k * first_hit[..., None], axis=(0, 1)),
            "first_count": jnp.sum(by_k, axis=(0, 1)),
            "depth_hit": jnp.sum(hit, axis=(0, 1)), "depth_count": jnp.sum(slots, axis=(0, 1))}

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
                 valid: jax.Array, text: Optional[jax.Array] = None,
                 low_rank: bool = False, dtype: str = "") -> Callable:
    """The sampler's ``(codes, hidden, conditional) -> (logits, means)`` for these labels
    (and text); means are returned in embedding units (target normalisation undone). The
    unconditional call takes the null class and the null text. ``low_rank``: the second
    output is the means' low-rank rows ``[B, L, K, r]``, mapped by :meth:`project_fn`;
    ``dtype``: see :meth:`sampling_model`."""
    null = jnp.full_like(labels, self.null_class)
    null_txt = None if text is None else null_text(text)
    model = self.sampling_model(dtype)

    def network(codes, hidden, conditional):
      visible, _ = masking.split_embeddings(rvq.embed(codes, codebooks), hidden)
      logits, means = model.apply({"params": params["model"]}, visible, hidden,
                                  labels if conditional else null, valid,
                                  text=text if conditional else null_txt,
                                  low_rank_means=low_rank)
      if low_rank:
        return logits, means
      return logits, means * model_state["target_rms"][hidden][..., None, None]

    return network

  def project_fn(self, params, model_state) -> Callable:
    """``(rows [B, L, r], hidden [B, L]) -> means [B, L, d]`` in embedding units: what
    :meth:`network_fn` with ``low_rank`` leaves undone, for one row per position."""

    def project(rows, hidden):
      means = self.model.apply({"params": params["model"]}, rows,
                               method=ResGenTransformer.project_means)
      return means * model_state["target_rms"][hidden][..., None]

    return project

  def sample_tokens(self, params, model_state, codebooks, labels: jax.Array, rng: jax.Array,
                    scfg: ml_collections.ConfigDict) -> sampler.SampleOutput:
    """Every token in ``scfg.steps`` network calls (:func:`sampler.unmask` around
    :meth:`proposal`); ``reveal_step`` in 1..T."""
    start = jnp.zeros((labels.shape[0], self.num_positions, self.depth), jnp.int32)
    return self.infill(params, model_state, codebooks, start, jnp.zeros(start.shape, bool),
                       jnp.ones(start.shape[:2], bool), labels, rng, scfg)

  def infill(self, params, model_state, codebooks, codes: jax.Array, known: jax.Array,
             valid: jax.Array, labels: jax.Array, rng: jax.Array,
             scfg: ml_collections.ConfigDict, text: Optional[jax.Array] = None
             ) -> sampler.SampleOutput:
    """Fills the unknown tokens of ``codes [B, L, D]`` (``known``: a depth prefix per
    position, e.g. a speech prompt's frames) at the ``valid [B, L]`` positions, given the
    labels ``[B]`` (and ``text [B, S]``); known tokens come back unchanged. Positions
    outside ``valid`` (padding) are treated as known and never attended to."""
    known = known | ~valid[..., None]
    propose = self.proposal(params, model_state, codebooks, labels, valid, text, scfg)
    return sampler.unmask(propose, codes, known, rng, scfg)

  def proposal(self, params, model_state, codebooks, labels: jax.Array, valid: jax.Array,
               text: Optional[jax.Array], scfg: ml_collections.ConfigDict) -> Callable:
    """The sampler's proposal for these labels (and text): ResGen's mixture with the trained
    sigma, drawing each position's component before mapping its mean to ``d`` (peak memory
    ``[B, L, K, r]``, not ``[B, L, K, d]``)."""
    network = self.network_fn(params, model_state, codebooks, labels, valid, text,
                              low_rank=True, dtype=scfg.get("dtype", ""))
    return sampler.mixture_proposal(
        network, codebooks, scfg,
        sigma_fn=lambda hidden: self.embedding_sigma(params, model_state, hidden),
        project_fn=self.project_fn(params, model_state))
