"""Network layers every generator family shares: adaLN-Zero transformer blocks (DiT), the
text encoder of speech runs, their logical activation axes and tensor-parallel layout, the
text special ids the encoder reads, and the compute dtypes a config names.

ResGen (``generator/model.py``), direct token prediction (the same backbone) and the
RQ-Transformer (``baselines/rq_transformer.py``, causal blocks built from the same halves)
import them from here; moving a layer here keeps its Flax parameter names (they come from
the module and attribute names inside the calling network), so checkpoints still load.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config dtype names

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


TEXT_PAD = 0  # id of padding in text token sequences (audio/text.py PAD)
NULL_TEXT = 1  # the text token of "no text" (audio/text.py NULL): the CFG null condition
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
