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

Text conditioning (speech, ``text_vocab_size > 0``): a ``layers.TextEncoder`` (token and
position embeddings, ``text_layers`` bidirectional blocks over the non-padding tokens)
encodes the transcript, and its output conditions the network in one of two ways
(``text_mode``, a config choice the method leaves open):

* ``cross``: every block gets a cross-attention sublayer from the token positions to the
  text (after self-attention, before the MLP);
* ``prefix``: the encoded text is put before the token positions in one sequence and the
  blocks attend over both; outputs are read at the token positions only.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from resgen_jax.layers import (RESIDUAL_AXES, TEXT_MODES, TEXT_PAD, ScannedBlock, TextEncoder,
                               block_class, modulate)

Array = jax.Array


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
