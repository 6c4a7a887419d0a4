"""RQ-Transformer baseline (Lee et al. 2022, "Autoregressive Image Generation using Residual
Quantization") on the cached RVQ tokens, trained by the shared trainer like ResGen.

The token grid ``[L, D]`` is generated in raster order over positions and, at each
position, coarse to fine over depths: ``p(x) = prod_i prod_j p(x_ij | x_<i, x_i,<j)``.

Spatial transformer (``model.num_layers`` blocks), causal over the L positions. Its input at
position 0 is a learned start token plus the class embedding; at position i > 0 it is the
projected sum over depths of the code embeddings of position i - 1,
``token_in(sum_j e_j(x_{i-1,j}))``; plus a learned position embedding. Its output h_i sums up
every token before position i.

Depth transformer (``rq.depth_layers`` blocks of the same width and heads), causal over the
D depths of one position: its input at depth 0 is h_i and at depth j > 0 the projected
partial sum ``token_in(sum_{j'<j} e_j'(x_ij'))`` (the paper's choice: the RVQ
reconstruction so far), plus a learned depth embedding. Its output at depth j is float32
logits over the V codes of x_ij. ``token_in`` is one Dense, shared by both transformers, over
the tokenizer's frozen codebooks ``e_j`` (as the ResGen model sees the tokens).

Conditioning: the class embedding (id ``num_classes`` is the null class for classifier-free
guidance; training drops the class with probability ``loss.cond_dropout``) is added to the
start token and modulates every block of both transformers through adaLN-Zero, as in the
ResGen model, so both families see the class the same way.

Blocks name their parameters as the ResGen blocks do (``attn/{query,key,value,out}``,
``mlp_in``, ``mlp_out``, ``modulation``), so ``layers.TENSOR_PARALLEL_RULES`` lays them out.

Sampling draws the L x D tokens one by one: per position one spatial step, then D depth
steps, each a single-token call against explicit key/value caches threaded through
``lax.scan``. ``use_cache=False`` is the slow reference: it reruns the whole training
forward on the partly filled grid for every token. Both draw token (i, j) with
``fold_in(rng, i * D + j)``, so they give the same codes.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.generator import sampler
from resgen_jax.generator.task import TokenTask, token_nll
from resgen_jax.layers import (DTYPES, RESIDUAL_AXES, adaln_mlp, adaln_modulation, adaln_norm,
                               block_class, modulate)

Array = jax.Array
KVCache = Tuple[Array, Array]  # keys and values of one block, each [B, T, heads, head_dim]
EMBED_INIT_STD = 0.02  # learned start token, position and depth embeddings (as ResGen's)


def shift_right(x: Array, axis: int) -> Array:
  """``x`` moved one step along ``axis``: a zero entry first, the last entry dropped."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 0)
  return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, x.shape[axis], axis=axis)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention of positions ``index..index+S-1`` over themselves and every
  earlier position, with flax's MultiHeadDotProductAttention parameter layout."""
  num_heads: int
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, cache: Optional[KVCache], index, train: bool):
    """Args:
      x: ``[B, S, W]``, the positions ``index..index+S-1``.
      cache: None (``x`` is the whole sequence and ``index`` is 0), or the keys and values
        of all ``T >= index + S`` positions, valid before ``index``.
      index: int scalar, the position of ``x[:, 0]``.
    Returns:
      ``[B, S, W]`` and the keys and values (the cache with these positions written).
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    project = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                           name=name)(x)
    query, key, value = project("query"), project("key"), project("value")
    if cache is not None:
      write = lambda old, new: jax.lax.dynamic_update_slice_in_dim(
          old, new.astype(old.dtype), index, axis=1)
      key, value = write(cache[0], key), write(cache[1], value)
    scores = jnp.einsum("bshd,bthd->bhst", query, key).astype(jnp.float32) / math.sqrt(
        head_dim)
    visible = jnp.arange(key.shape[1])[None, :] <= (index + jnp.arange(x.shape[1]))[:, None]
    weights = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights.astype(self.dtype))
    out = jnp.einsum("bhst,bthd->bshd", weights, value)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    return out, (key, value)


class CausalBlock(nn.Module):
  """Pre-LN adaLN-Zero block (layers.AdaLNBlock) with causal self-attention that
  reads and extends a key/value cache."""
  width: int
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array, cache: Optional[KVCache], index, train: bool):
    """x ``[B, S, W]``, cond ``[B, W]``; cache and index as in CausalSelfAttention.
    Returns ``(x [B, S, W], keys and values)``."""
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(cond, self.width,
                                                                    self.dtype)
    h, kv = CausalSelfAttention(self.num_heads, self.dropout, self.dtype, name="attn")(
        modulate(adaln_norm("ln_attn", self.dtype)(x), shift1, scale1), cache, index, train)
    return adaln_mlp(x + gate1 * h, shift2, scale2, gate2, self.mlp_ratio, self.dropout,
                     train, self.dtype), kv


def causal_block_class(remat: bool, policy: str = ""):
  """CausalBlock, rematerialised in the backward pass as ``layers.block_class``
  says (which also validates the policy name)."""
  block_class(remat, policy)
  if not remat:
    return CausalBlock
  return nn.remat(CausalBlock, static_argnums=(5,),
                  policy=getattr(jax.checkpoint_policies, policy) if policy else None)


def run_blocks(blocks: Sequence[nn.Module], x: Array, cond: Array,
               caches: Optional[List[KVCache]], index, train: bool):
  """``x`` through ``blocks``, each with its own cache (``caches`` None: no caches).
  Returns ``(x, caches with the positions of x written, or None)``."""
  written = []
  for block, cache in zip(blocks, caches if caches is not None else [None] * len(blocks)):
    x, kv = block(x, cond, cache, index, train)
    written.append(kv)
  return x, (written if caches is not None else None)


class RQTransformer(nn.Module):
  """Spatial and depth transformers over ``[L, D]`` token grids (see the module doc)."""
  num_positions: int  # L
  token_depth: int  # D
  codebook_size: int  # V
  num_classes: int  # the null class is id num_classes
  width: int
  num_layers: int  # spatial transformer blocks
  depth_layers: int  # depth transformer blocks
  num_heads: int
  mlp_ratio: int
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = ""  # see layers.block_class
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    block = causal_block_class(self.remat, self.remat_policy)
    make = lambda: block(self.width, self.num_heads, self.mlp_ratio, self.dropout, self.dtype)
    self.spatial_blocks = [make() for _ in range(self.num_layers)]
    self.depth_blocks = [make() for _ in range(self.depth_layers)]
    self.token_in = nn.Dense(self.width, dtype=self.dtype)
    self.class_embedding = nn.Embed(self.num_classes + 1, self.width)
    init = nn.initializers.normal(EMBED_INIT_STD)
    self.start_token = self.param("start_token", init, (self.width,))
    self.pos_embedding = self.param("pos_embedding", init, (self.num_positions, self.width))
    self.depth_embedding = self.param("depth_embedding", init,
                                      (self.token_depth, self.width))
    self.ln_spatial = nn.LayerNorm(dtype=self.dtype)
    self.ln_depth = nn.LayerNorm(dtype=jnp.float32)
    self.head = nn.Dense(self.codebook_size, dtype=jnp.float32)

  def spatial(self, prev_sums: Array, labels: Array, index, caches=None, train=False):
    """Context of positions ``index..index+S-1``.

    Args:
      prev_sums: ``[B, S, d]``, for each position the sum over depths of the embeddings of
        the previous position's codes (ignored at position 0).
      labels: int ``[B]``.
      caches: None (the positions are ``0..S-1``), or one KVCache ``[B, L, heads, head_dim]``
        per spatial block.
    Returns:
      h ``[B, S, W]`` and the caches with these positions written (None without).
    """
    length = prev_sums.shape[1]
    cond = self.class_embedding(labels)
    first = (index + jnp.arange(length) == 0)[None, :, None]
    x = jnp.where(first, (self.start_token + cond)[:, None], self.token_in(prev_sums))
    x = x + jax.lax.dynamic_slice_in_dim(self.pos_embedding, index, length)
    x = nn.with_logical_constraint(x.astype(self.dtype), RESIDUAL_AXES)
    x, caches = run_blocks(self.spatial_blocks, x, cond, caches, index, train)
    return self.ln_spatial(x), caches

  def depth(self, context: Array, partial_sums: Array, labels: Array, index, caches=None,
            train=False):
    """Logits of depths ``index..index+S-1`` of N positions.

    Args:
      context: ``[N, W]``, h of each position.
      partial_sums: ``[N, S, d]``, for each depth the sum of the embeddings of the depths
        before it (ignored at depth 0).
      labels: int ``[N]``.
      caches: None (the depths are ``0..S-1``), or one KVCache ``[N, D, heads, head_dim]``
        per depth block.
    Returns:
      float32 logits ``[N, S, V]`` and the caches with these depths written (None without).
    """
    length = partial_sums.shape[1]
    first = (index + jnp.arange(length) == 0)[None, :, None]
    x = jnp.where(first, context[:, None], self.token_in(partial_sums))
    x = x + jax.lax.dynamic_slice_in_dim(self.depth_embedding, index, length)
    x = nn.with_logical_constraint(x.astype(self.dtype), RESIDUAL_AXES)
    x, caches = run_blocks(self.depth_blocks, x, self.class_embedding(labels), caches, index,
                           train)
    return self.head(self.ln_depth(x.astype(jnp.float32))), caches

  def __call__(self, embeddings: Array, labels: Array, train: bool = False) -> Array:
    """Teacher-forced logits of every token.

    Args:
      embeddings: ``[B, L, D, d]``, the code embeddings ``e_j(x_ij)``.
      labels: int ``[B]`` in 0..num_classes (num_classes = null).
    Returns:
      float32 ``[B, L, D, V]``; those of token (i, j) see only the tokens before it
      (earlier positions, then earlier depths of position i).
    """
    batch, length, depth, dim = embeddings.shape
    if length > self.num_positions or depth != self.token_depth:
      raise ValueError(f"tokens [{length}, {depth}] do not fit the model's "
                       f"[{self.num_positions}, {self.token_depth}]")
    context, _ = self.spatial(shift_right(embeddings.sum(-2), axis=1), labels, 0, None, train)
    partial = shift_right(jnp.cumsum(embeddings, axis=2), axis=2)
    logits, _ = self.depth(context.reshape(batch * length, self.width),
                           partial.reshape(batch * length, depth, dim),
                           jnp.repeat(labels, length), 0, None, train)
    return logits.reshape(batch, length, depth, self.codebook_size)


class RQTransformerTask(TokenTask):
  """The RQ-Transformer over token grids ``[L, D]`` with ``num_classes`` classes; batches
  as GeneratorTask's."""

  def __init__(self, cfg: ml_collections.ConfigDict, codebooks: np.ndarray,
               num_positions: int, depth: int, num_classes: int):
    m = cfg.model
    if cfg.rq.depth_layers < 1:
      raise ValueError(f"generator.rq.depth_layers must be >= 1, got {cfg.rq.depth_layers}")
    if m.scan_layers:
      raise ValueError("generator.model.scan_layers is not supported by the rq_transformer "
                       "family (its key/value caches are per block); set it to False")
    super().__init__(cfg, codebooks, num_positions, depth, num_classes)
    rvq.books_for_depth(self.codebooks, depth)  # validates the books against the depth
    self.model = RQTransformer(
        num_positions=num_positions, token_depth=depth, codebook_size=codebooks.shape[1],
        num_classes=num_classes, width=m.width, num_layers=m.num_layers,
        depth_layers=cfg.rq.depth_layers, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        dropout=m.dropout, remat=m.remat, remat_policy=m.remat_policy,
        dtype=DTYPES[m.dtype])
    causal_block_class(m.remat, m.remat_policy)  # validates the policy name

  def init(self, rng, batch):
    codes, labels, _ = self.flatten(batch)
    params = self.model.init(rng, rvq.embed(codes, self.codebooks), labels)["params"]
    return {"model": params}, {}

  def logits(self, params, codebooks, codes: Array, labels: Array, train: bool = False,
             rng: Optional[Array] = None) -> Array:
    """Teacher-forced float32 logits ``[B, L, D, V]`` of codes ``[B, L, D]`` (entries
    :data:`rvq.UNUSED_CODE` embed to zero); ``rng`` draws dropout in training."""
    return self.model.apply({"params": params["model"]}, rvq.embed(codes, codebooks), labels,
                            train=train, rngs={"dropout": rng} if train else {})

  def per_example(self, params, constants, batch, rng: Optional[Array], train: bool):
    """Mean token NLL and accuracy of every example over its real positions, and their
    counts: ``([B], [B], [B])``. In training (only) ``rng`` drops the class with
    probability ``loss.cond_dropout`` and draws dropout."""
    codes, labels, valid = self.flatten(batch)
    if train:
      drop_key, rng = jax.random.split(rng)
      dropped = jax.random.bernoulli(drop_key, self.cfg.loss.cond_dropout, labels.shape)
      labels = jnp.where(dropped, self.null_class, labels)
    logits = self.logits(params, constants["codebooks"], codes, labels, train, rng)
    nll, correct = token_nll(logits, codes)
    weights = jnp.broadcast_to(valid[..., None], codes.shape).astype(jnp.float32)
    count = jnp.sum(weights, axis=(1, 2))
    divisor = jnp.maximum(count, 1.0)  # an all-padding example weighs 0, not NaN
    return (jnp.sum(nll * weights, axis=(1, 2)) / divisor,
            jnp.sum(correct * weights, axis=(1, 2)) / divisor, count)

  def losses(self, params, constants, batch, rng, train: bool):
    """``(loss, metrics)``: the mean cross-entropy over every real token of the batch."""
    nll, accuracy, count = self.per_example(params, constants, batch, rng, train)
    mean = lambda per_example: jnp.sum(per_example * count) / jnp.sum(count)
    loss = mean(nll)
    return loss, {"nll": loss, "accuracy": mean(accuracy)}

  def loss_and_grads(self, params, model_state, constants, batch, rng, step):
    del step
    (loss, metrics), grads = jax.value_and_grad(self.losses, has_aux=True)(
        params, constants, batch, rng, True)
    return loss, grads, model_state, metrics

  def eval_step(self, params, model_state, constants, batch):
    del model_state
    valid = batch["valid"].astype(jnp.float32)
    example_batch = {k: v for k, v in batch.items() if k != "valid"}
    nll, accuracy, _ = self.per_example(params, constants, example_batch, None, False)
    return {"loss": jnp.sum(nll * valid), "nll": jnp.sum(nll * valid),
            "accuracy": jnp.sum(accuracy * valid), "count": jnp.sum(valid)}

  def empty_caches(self, batch: int, length: int, num_blocks: int, dtype) -> List[KVCache]:
    """Zero key/value caches of ``length`` steps for ``num_blocks`` blocks, in the compute
    ``dtype`` of the network that fills them."""
    m = self.cfg.model
    shape = (batch, length, m.num_heads, m.width // m.num_heads)
    zeros = lambda: jnp.zeros(shape, dtype)
    return [(zeros(), zeros()) for _ in range(num_blocks)]

  def cached_decoder(self, variables, codebooks, labels: Array, model=None):
    """``(initial state, begin_position, token_logits)`` of the cached sampler.

    The state is the spatial caches, the current context h ``[N, W]`` and the depth caches
    of the current position. ``begin_position(state, codes, i)`` runs one spatial step on
    position ``i - 1``'s tokens; ``token_logits(state, codes, i, j)`` one depth step on the
    partial sum of position ``i``'s depths before ``j``.
    """
    model = model or self.model  # the network to run (:meth:`sampling_model`)
    n = labels.shape[0]
    fresh_depth = self.empty_caches(n, self.depth, self.cfg.rq.depth_layers, model.dtype)

    def begin_position(state, codes, i):
      spatial_caches, _, _ = state
      prev = jax.lax.dynamic_index_in_dim(codes, jnp.maximum(i - 1, 0), axis=1)  # [N, 1, D]
      h, spatial_caches = model.apply(
          variables, rvq.embed(prev, codebooks).sum(-2), labels, i, spatial_caches,
          method=RQTransformer.spatial)
      return spatial_caches, h[:, 0], fresh_depth

    def token_logits(state, codes, i, j):
      spatial_caches, h, depth_caches = state
      current = jax.lax.dynamic_index_in_dim(codes, i, axis=1)  # [N, 1, D], depths < j set
      logits, depth_caches = model.apply(
          variables, h, rvq.embed(current, codebooks).sum(-2), labels, j, depth_caches,
          method=RQTransformer.depth)
      return logits[:, 0], (spatial_caches, h, depth_caches)

    spatial = self.empty_caches(n, self.num_positions, self.cfg.model.num_layers, model.dtype)
    context = jnp.zeros((n, self.cfg.model.width), model.dtype)
    return (spatial, context, fresh_depth), begin_position, token_logits

  def full_decoder(self, variables, codebooks, labels: Array, model=None):
    """The uncached reference with the interface of :meth:`cached_decoder`: the whole
    teacher-forced forward on the partly filled grid for every token."""
    model = model or self.model

    def token_logits(state, codes, i, j):
      logits = model.apply(variables, rvq.embed(codes, codebooks), labels)
      return logits[jnp.arange(codes.shape[0]), i, j], state
    return (), lambda state, codes, i: state, token_logits

  def sample_tokens(self, params, model_state, codebooks, labels: Array, rng: Array,
                    scfg: ml_collections.ConfigDict) -> sampler.SampleOutput:
    """:meth:`sample_codes` with the raster order as the reveal history: token (i, j) is
    the network call ``i * D + j + 1``."""
    codes = self.sample_codes(params, model_state, codebooks, labels, rng, scfg)
    order = jnp.arange(1, self.num_positions * self.depth + 1, dtype=jnp.int32)
    return sampler.SampleOutput(codes=codes, reveal_step=jnp.broadcast_to(
        order.reshape(self.num_positions, self.depth), codes.shape))

  def sample_codes(self, params, model_state, codebooks, labels: Array, rng: Array,
                   scfg: ml_collections.ConfigDict, use_cache: bool = True) -> Array:
    """Autoregressive samples, raster order over positions and coarse to fine over depths.

    Pure and jittable (close over ``scfg`` and ``use_cache``): a ``lax.scan`` over the L
    positions with a scan over the D depths inside, one token draw each. With
    ``scfg.cfg_scale`` w != 1 the conditional and null-class streams run as one doubled
    batch and tokens are drawn from ``l_u + w (l_c - l_u)``; ``cfg_ramp="linear"`` ramps w
    from 1 to ``cfg_scale`` over the L x D draws in order, as the step samplers ramp it over
    their T steps.

    Args:
      codebooks: ``[C, V, d]`` tokenizer codebooks.
      labels: int ``[B]``.
      rng: key; token (i, j) is drawn with ``fold_in(rng, i * D + j)``.
      scfg: sampler config: ``temperature`` (0: argmax), ``top_k`` (0: off), ``top_p``
        (1: off), ``cfg_scale``, ``cfg_ramp``.
      use_cache: key/value caches (one spatial step per position and one depth step per
        token) or the slow reference (the full forward per token); same codes.
    Returns:
      int32 codes ``[B, L, D]``.
    """
    del model_state
    sampler.check_settings(scfg)
    guided = scfg.cfg_scale != 1.0
    streams = (jnp.concatenate([labels, jnp.full_like(labels, self.null_class)]) if guided
               else labels).astype(jnp.int32)
    decoder = self.cached_decoder if use_cache else self.full_decoder
    state, begin_position, token_logits = decoder(
        {"params": params["model"]}, codebooks, streams,
        self.sampling_model(scfg.get("dtype", "")))

    draws = self.num_positions * self.depth

    def draw(logits, i, j):
      n = i * self.depth + j  # 0-based draw index
      if guided:
        cond, uncond = jnp.split(logits, 2)
        w = sampler.guidance_scale(scfg.cfg_scale, scfg.cfg_ramp, n + 1, draws)
        logits = uncond + w * (cond - uncond)
      codes = sampler.draw_tokens(jax.random.fold_in(rng, n), logits, scfg.temperature,
                                  scfg.top_k, scfg.top_p)
      return jnp.tile(codes, 2) if guided else codes

    def position(carry, i):
      codes, state = carry
      state = begin_position(state, codes, i)

      def token(carry, j):
        codes, state = carry
        logits, state = token_logits(state, codes, i, j)
        return (codes.at[:, i, j].set(draw(logits, i, j)), state), None

      return jax.lax.scan(token, (codes, state), jnp.arange(self.depth))[0], None

    codes = jnp.full((streams.shape[0], self.num_positions, self.depth), rvq.UNUSED_CODE,
                     jnp.int32)
    (codes, _), _ = jax.lax.scan(position, (codes, state), jnp.arange(self.num_positions))
    return codes[:labels.shape[0]]
