"""The ResGen network: a transformer over token positions with a mixture-of-Gaussians head.

Input per position i (method.md section 3, our default): the cumulative embedding of its
visible depth prefix projected to the model width, plus a learned embedding of its hidden
count ``k_i`` (0..D), plus a learned position embedding. The class condition (id
``num_classes`` is the null class for classifier-free guidance) modulates every block
through adaLN-Zero (DiT). Padding positions (``valid == False``) are masked out of
attention as keys, so they never change real positions' outputs.

Output per position (``head="mixture"``, ResGen): logits ``[K]`` and means ``[K, d]`` of a
K-component mixture; means go through a low-rank projection (width -> K x r -> d, the r -> d
map shared by components) followed by a learned per-dimension scale and shift.

``head="tokens"`` is the direct-token baseline on the same backbone: logits ``[D, V]``, a
softmax over the V codes of every depth (only hidden depths are trained and sampled).

Text conditioning (speech, ``text_vocab_size > 0``): a :class:`TextEncoder` (token and
position embeddings, ``text_layers`` bidirectional blocks over the non-padding tokens)
encodes the transcript, and its output conditions the network in one of two ways
(``text_mode``, a config choice the method leaves open):

* ``cross``: every block gets a cross-attention sublayer from the token positions to the
  text (after self-attention, before the MLP);
* ``prefix``: the encoded text is put before the token positions in one sequence and the
  blocks attend over both; outputs are read at the token positions only.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Megatron-style tensor parallelism for the blocks (config.mesh.rules, train/mesh.py): heads
# and the MLP's hidden units are split over ``tensor``, the model width over ``fsdp``, so
# each block needs one reduction over ``tensor`` after attention and one after the MLP.
# Optimizer moments end in the same paths and get the same layout.
TENSOR_PARALLEL_RULES = (
    # Layers under nn.scan (scan_layers=True) carry a leading layer axis, kept whole.
    (r"blocks/.*attn/(query|key|value)/kernel$", (None, "fsdp", "tensor", None)),
    (r"blocks/.*attn/(query|key|value)/bias$", (None, "tensor", None)),
    (r"blocks/.*attn/out/kernel$", (None, "tensor", None, "fsdp")),
    (r"blocks/.*mlp_in/kernel$", (None, "fsdp", "tensor")),
    (r"blocks/.*mlp_in/bias$", (None, "tensor")),
    (r"blocks/.*mlp_out/kernel$", (None, "tensor", "fsdp")),
    (r"blocks/.*/modulation/kernel$", (None, "fsdp", "tensor")),
    (r"blocks/.*/modulation/bias$", (None, "tensor")),
    (r"attn/(query|key|value)/kernel$", ("fsdp", "tensor", None)),  # [width, heads, head]
    (r"attn/(query|key|value)/bias$", ("tensor", None)),  # [heads, head]
    (r"attn/out/kernel$", ("tensor", None, "fsdp")),  # [heads, head, width]
    (r"mlp_in/kernel$", ("fsdp", "tensor")),  # [width, mlp]
    (r"mlp_in/bias$", ("tensor",)),  # [mlp]
    (r"mlp_out/kernel$", ("tensor", "fsdp")),  # [mlp, width]
    # adaLN: [width, 6 width] per block, a third of a block's parameters, applied once per
    # example (not per position), so its output is split over tensor too.
    (r"/modulation/kernel$", ("fsdp", "tensor")),
    (r"/modulation/bias$", ("tensor",)),
)


TEXT_PAD = 0  # id of padding in text token sequences (audio/text.py: PAD)
TEXT_MODES = ("cross", "prefix")


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1.0 + scale) + shift


# Logical axes of the activations; config.mesh.activation_rules maps them to mesh axes
# while a training step is traced (train/mesh.py), and outside that they constrain nothing.
RESIDUAL_AXES = ("batch", "length", "embed")
MLP_AXES = ("batch", "length", "mlp")


def adaln_modulation(cond: Array, width: int, dtype) -> list:
  """adaLN-Zero: class conditioning ``[B, W]`` -> shift, scale, gate of the attention half
  and of the MLP half, each ``[B, 1, W]`` (the Dense starts at zero: gates closed).
  Called inside a block's compact method (its parameters are the block's ``modulation``)."""
  mod = nn.Dense(6 * width, kernel_init=nn.initializers.zeros, dtype=dtype,
                 name="modulation")(nn.silu(cond))[:, None]
  return jnp.split(mod, 6, axis=-1)


def adaln_norm(name: str, dtype) -> nn.Module:
  return nn.LayerNorm(use_scale=False, use_bias=False, dtype=dtype, name=name)


def adaln_mlp(x: Array, shift: Array, scale: Array, gate: Array, mlp_ratio: int,
              dropout: float, train: bool, dtype) -> Array:
  """The MLP half of a block: ``x + gate * MLP(modulate(LN(x)))``, ``[B, S, W]``. Called
  inside a block's compact method (parameters ``ln_mlp``, ``mlp_in``, ``mlp_out``)."""
  width = x.shape[-1]
  h = modulate(adaln_norm("ln_mlp", dtype)(x), shift, scale)
  h = nn.Dense(mlp_ratio * width, dtype=dtype, name="mlp_in")(h)
  h = nn.with_logical_constraint(h, MLP_AXES)
  h = nn.Dropout(dropout, deterministic=not train)(nn.gelu(h))
  h = nn.Dense(width, dtype=dtype, name="mlp_out")(h)
  return nn.with_logical_constraint(x + gate * h, RESIDUAL_AXES)


class AdaLNBlock(nn.Module):
  """Pre-LN transformer block with adaLN-Zero conditioning (gates start at zero), and with
  ``cross_attention`` a pre-LN cross-attention sublayer to a context (the encoded text)."""
  width: int
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: jnp.dtype = jnp.float32
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: Array, cond: Array, attn_mask: Array, train: bool,
               context: Optional[Array] = None, context_mask: Optional[Array] = None) -> Array:
    """x ``[B, S, W]``, cond ``[B, W]``, attn_mask ``[B, 1, S, S]``; with cross-attention
    context ``[B, S_c, W]`` and context_mask ``[B, 1, S, S_c]``."""
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(cond, self.width,
                                                                    self.dtype)
    attention = functools.partial(
        nn.MultiHeadDotProductAttention, num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.dropout, deterministic=not train)
    h = modulate(adaln_norm("ln_attn", self.dtype)(x), shift1, scale1)
    x = x + gate1 * attention(name="attn")(h, h, mask=attn_mask)
    if self.cross_attention:
      h = nn.LayerNorm(dtype=self.dtype, name="ln_cross")(x)
      x = x + attention(name="cross_attn")(h, context, mask=context_mask)
    return adaln_mlp(x, shift2, scale2, gate2, self.mlp_ratio, self.dropout, train,
                     self.dtype)


class TextEncoder(nn.Module):
  """Text tokens ``[B, S]`` (``TEXT_PAD`` = padding) -> encodings ``[B, S, W]``:
  embeddings plus learned positions through ``num_layers`` bidirectional adaLN blocks
  (conditioned like the main network) whose keys are the non-padding tokens."""
  vocab_size: int
  max_length: int
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, cond: Array, train: bool = False) -> Array:
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"{tokens.shape[1]} text tokens exceed the model's {self.max_length}")
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.max_length, self.width))
    x = (nn.Embed(self.vocab_size, self.width, name="embedding")(tokens)
         + pos[:tokens.shape[1]]).astype(self.dtype)
    mask = nn.make_attention_mask(jnp.ones(tokens.shape, bool), tokens != TEXT_PAD)
    for i in range(self.num_layers):
      x = AdaLNBlock(self.width, self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                     name=f"block_{i}")(x, cond, mask, train)
    return nn.LayerNorm(dtype=self.dtype, name="ln_out")(x)


def block_class(remat: bool, policy: str = ""):
  """AdaLNBlock, rematerialised in the backward pass when ``remat``: everything is
  recomputed (``policy`` empty) or what ``jax.checkpoint_policies.<policy>`` lets it save,
  e.g. ``dots_with_no_batch_dims_saveable`` keeps the matmul outputs."""
  if not remat:
    return AdaLNBlock
  if policy and not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f"unknown remat_policy {policy!r}: a name in jax.checkpoint_policies, "
                     f"e.g. 'dots_with_no_batch_dims_saveable'")
  return nn.remat(AdaLNBlock, static_argnums=(4,),
                  policy=getattr(jax.checkpoint_policies, policy) if policy else None)


class ScannedBlock(nn.Module):
  """One AdaLNBlock in the form nn.scan wants: ``(x, cond, mask) -> (x, None)``."""
  width: int
  num_heads: int
  mlp_ratio: int
  dropout: float
  dtype: jnp.dtype
  train: bool
  remat: bool
  remat_policy: str = ""

  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: Array, cond: Array, attn_mask: Array, *context):
    block = block_class(self.remat, self.remat_policy)
    return block(self.width, self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                 self.cross_attention, name="block")(x, cond, attn_mask, self.train,
                                                     *context), None


class ResGenTransformer(nn.Module):
  """Visible prefix sums and hidden counts -> mixture over each position's hidden sum."""
  num_positions: int  # L
  token_depth: int  # D
  latent_dim: int  # d
  num_classes: int  # the null class is id num_classes
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  num_components: int  # K
  low_rank: int  # r
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = ""  # see block_class
  scan_layers: bool = False  # blocks under nn.scan: one compiled body, params [layers, ...]
  dtype: jnp.dtype = jnp.float32
  head: str = "mixture"  # mixture (ResGen) or tokens (a softmax per depth, the baseline)
  codebook_size: int = 0  # V, for head="tokens"
  text_vocab_size: int = 0  # text token ids (PAD and NULL included); 0: no text input
  max_text_length: int = 0  # S_max, text tokens the encoder takes
  text_layers: int = 0  # TextEncoder blocks
  text_mode: str = "cross"  # cross | prefix (see the module docstring)

  @nn.compact
  def __call__(self, visible_sum: Array, hidden: Array, labels: Array,
               valid: Optional[Array] = None, train: bool = False,
               text: Optional[Array] = None, low_rank_means: bool = False):
    """Args:
      visible_sum: ``[B, L, d]``; hidden: int ``[B, L]`` in 0..D; labels: int ``[B]`` in
      0..num_classes (num_classes = null); valid: bool ``[B, L]`` (None: all valid);
      text: int ``[B, S]`` text tokens (``TEXT_PAD`` = padding) when ``text_vocab_size``;
      low_rank_means: return the means before their shared ``r -> d`` map (the sampler
      draws a component first and maps only its row, :meth:`project_means`).
    Returns:
      ``head="mixture"``: logits ``[B, L, K]`` and means ``[B, L, K, d]`` (float32), or
      with ``low_rank_means`` their low-rank rows ``[B, L, K, r]``;
      ``head="tokens"``: logits ``[B, L, D, V]`` (float32).
    """
    batch, length, _ = visible_sum.shape
    if length > self.num_positions:
      raise ValueError(f"{length} positions exceed the model's {self.num_positions}")
    valid = jnp.ones((batch, length), bool) if valid is None else valid
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.num_positions, self.width))
    x = (nn.Dense(self.width, dtype=self.dtype, name="visible_in")(visible_sum)
         + nn.Embed(self.token_depth + 1, self.width, name="hidden_count")(hidden)
         + pos[:length]).astype(self.dtype)
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    cond = nn.Embed(self.num_classes + 1, self.width, name="class_embedding")(labels)
    keys, context = valid, ()
    if self.text_vocab_size:
      if text is None:
        raise ValueError("this model is conditioned on text: pass text tokens [B, S]")
      if self.text_mode not in TEXT_MODES:
        raise ValueError(f"generator.model.text_mode must be one of {TEXT_MODES}, got "
                         f"{self.text_mode!r}")
      encoded = TextEncoder(self.text_vocab_size, self.max_text_length, self.width,
                            self.text_layers, self.num_heads, self.mlp_ratio, self.dropout,
                            self.dtype, name="text_encoder")(text, cond, train)
      if self.text_mode == "prefix":
        x, keys = jnp.concatenate([encoded, x], 1), jnp.concatenate([text != TEXT_PAD, valid], 1)
      else:
        context = (encoded, nn.make_attention_mask(jnp.ones_like(valid), text != TEXT_PAD))
    attn_mask = nn.make_attention_mask(jnp.ones_like(keys), keys)  # keys: real only
    cross = bool(context)
    if self.scan_layers:
      stack = nn.scan(ScannedBlock, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * (2 + len(context)), length=self.num_layers)
      x, _ = stack(self.width, self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                   train, self.remat, self.remat_policy, cross,
                   name="blocks")(x, cond, attn_mask, *context)
    else:
      block = block_class(self.remat, self.remat_policy)
      for i in range(self.num_layers):
        x = block(self.width, self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                  cross, name=f"block_{i}")(x, cond, attn_mask, train, *context)
    x = x[:, x.shape[1] - length:]  # the token positions (after a text prefix)
    shift, scale = jnp.split(
        nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, name="final_modulation")(
            nn.silu(cond))[:, None], 2, axis=-1)
    h = modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="ln_final")(x),
                 shift, scale).astype(jnp.float32)
    if self.head == "tokens":
      logits = nn.Dense(self.token_depth * self.codebook_size, name="token_logits")(h)
      return logits.reshape(batch, length, self.token_depth, self.codebook_size)
    logits = nn.Dense(self.num_components, name="logits")(h)
    low = nn.Dense(self.num_components * self.low_rank, name="means_low_rank")(h)
    low = low.reshape(batch, length, self.num_components, self.low_rank)
    means_out = nn.Dense(self.latent_dim, use_bias=False, name="means_out")
    mean_scale = self.param("mean_scale", nn.initializers.ones, (self.latent_dim,))
    mean_shift = self.param("mean_shift", nn.initializers.zeros, (self.latent_dim,))
    if low_rank_means:
      return logits, low
    return logits, means_out(low) * mean_scale + mean_shift

  def project_means(self, low: Array) -> Array:
    """Low-rank mean rows ``[..., r]`` -> means ``[..., d]``: the head's shared ``r -> d``
    map, scale and shift (affine, so it commutes with CFG's mix of two calls' rows).
    Applied to one chosen component per position it skips the ``[B, L, K, d]`` tensor."""
    params = self.variables["params"]
    return (jnp.einsum("...r,rd->...d", low, params["means_out"]["kernel"])
            * params["mean_scale"] + params["mean_shift"])
