"""The RVQ image tokenizer: autoencoder + residual quantizer, and its training stage.

:class:`Tokenizer` is the public surface (pure methods over explicit parameters):

    codes = tok.encode(params, codebooks, images)            # uint8 [B,H,W,C] -> [B,h,w,D]
    images = tok.decode(params, codebooks, codes, prefix=4)  # -> float [B,H,W,C] in [-1,1]

:class:`TokenizerTask` trains it with the shared trainer: reconstruction loss, commitment
loss, EMA codebooks updated on the global batch with dead-code restart, optional k-means
initialisation, quantizer dropout, perceptual loss and a hinge GAN with a delayed start.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from resgen_jax.codec import autoencoder, losses, rvq
from resgen_jax.layers import DTYPES
from resgen_jax.train.task import Task
from resgen_jax.utils import images as image_utils


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


class Tokenizer:
  """Encoder, decoder and quantizer of a ``config.tokenizer`` for images with C channels."""

  def __init__(self, cfg: ml_collections.ConfigDict, image_channels: int):
    m, q = cfg.model, cfg.quantizer
    if q.depth < 1 or q.codebook_size < 2:
      raise ValueError(f"tokenizer.quantizer needs depth >= 1 and codebook_size >= 2, got "
                       f"depth={q.depth}, codebook_size={q.codebook_size}")
    self.cfg = cfg
    self.depth = q.depth
    self.codebook_size = q.codebook_size
    self.latent_dim = m.latent_dim
    self.num_books = 1 if q.shared_codebook else q.depth
    self.downsample = autoencoder.downsample_factor(m.channel_multipliers)
    self.autoencoder = autoencoder.AutoEncoder(
        channels=m.channels, channel_multipliers=tuple(m.channel_multipliers),
        num_res_blocks=m.num_res_blocks, latent_dim=m.latent_dim,
        image_channels=image_channels, norm_groups=m.norm_groups,
        mid_attention=m.mid_attention, dtype=_dtype(m.dtype))

  def grid_shape(self, image_size: int) -> Tuple[int, int]:
    return image_size // self.downsample, image_size // self.downsample

  def encode_latents(self, params, images: jax.Array) -> jax.Array:
    """float images ``[B,H,W,C]`` in [-1,1] -> latents ``[B,h,w,d]``."""
    return self.autoencoder.apply({"params": params}, images,
                                  method=autoencoder.AutoEncoder.encode)

  def decode_latents(self, params, latents: jax.Array) -> jax.Array:
    """latents ``[B,h,w,d]`` -> float images ``[B,H,W,C]`` clipped to [-1,1]."""
    out = self.autoencoder.apply({"params": params}, latents,
                                 method=autoencoder.AutoEncoder.decode)
    return jnp.clip(out, -1.0, 1.0)

  def encode(self, params, codebooks: jax.Array, images: jax.Array) -> jax.Array:
    """uint8 images ``[B,H,W,C]`` -> int32 codes ``[B,h,w,D]``."""
    z = self.encode_latents(params, image_utils.to_float(images))
    return rvq.quantize(z, codebooks, depth=self.depth).codes

  def decode(self, params, codebooks: jax.Array, codes: jax.Array,
             prefix: Optional[int] = None) -> jax.Array:
    """codes ``[B,h,w,D]`` -> float images ``[B,H,W,C]``, using the first ``prefix`` depths."""
    if codes.shape[-1] != self.depth:
      raise ValueError(f"codes have depth {codes.shape[-1]}, the tokenizer has {self.depth}")
    return self.decode_latents(params, rvq.dequantize(codes, codebooks, prefix))

  def init_codebooks(self, rng: jax.Array) -> jax.Array:
    """Random ``[C, V, d]`` codebooks (replaced by k-means or dead-code restarts)."""
    shape = (self.num_books, self.codebook_size, self.latent_dim)
    return self.cfg.quantizer.init_scale * jax.random.normal(rng, shape)


def prefix_reconstructions(tok: Tokenizer, params, codebooks: jax.Array,
                           images: jax.Array) -> jax.Array:
  """Reconstructions from every depth prefix: uint8 ``[B,H,W,C]`` -> float ``[D,B,H,W,C]``.

  Decodes one prefix at a time (``lax.map``) so the decoder's activations do not grow
  with D.
  """
  return prefix_decodes(tok, params, codebooks, image_utils.to_float(images))


def prefix_decodes(tok: "Tokenizer", params, codebooks: jax.Array, x: jax.Array) -> jax.Array:
  """Decodes of every depth prefix of the model input ``x [B, *spatial, C]`` (images in
  [-1, 1], or normalised log-mels) -> ``[D, B, *spatial, C]``, one prefix at a time
  (``lax.map``) so the decoder's activations do not grow with D."""
  codes = rvq.quantize(tok.encode_latents(params, x), codebooks, depth=tok.depth).codes
  cumulative = jnp.moveaxis(rvq.cumulative_embeddings(codes, codebooks), -2, 0)
  return jax.lax.map(lambda latents: tok.decode_latents(params, latents), cumulative)


def prefix_psnr(tok: Tokenizer, params, codebooks: jax.Array, images: jax.Array) -> jax.Array:
  """Reconstruction PSNR (dB, images in [0,1]) of every depth prefix. -> ``[D, B]``."""
  return prefix_quality(tok, params, codebooks, images)[0]


def prefix_quality(tok: Tokenizer, params, codebooks: jax.Array, images: jax.Array):
  """Reconstruction PSNR (dB) and, for images of at least SSIM_WINDOW pixels a side, SSIM of
  every depth prefix. -> ``([D, B], [D, B] or None)``."""
  recons, x = prefix_reconstructions(tok, params, codebooks, images), image_utils.to_float(images)
  with_ssim = min(x.shape[-3], x.shape[-2]) >= image_utils.SSIM_WINDOW
  return image_utils.psnr(recons, x), image_utils.ssim(recons, x) if with_ssim else None


class TokenizerTask(Task):
  """Stage 1: trains the tokenizer (``config.tokenizer``)."""

  name = "tokenizer"
  training_only_params = ("discriminator",)

  def __init__(self, cfg: ml_collections.ConfigDict, image_channels: int,
               tokenizer: Optional[Tokenizer] = None):
    self.cfg = cfg
    self.tok = tokenizer or Tokenizer(cfg, image_channels)
    loss = cfg.loss
    self.use_gan = loss.gan_weight > 0
    self.use_perceptual = loss.perceptual_weight > 0
    if self.use_perceptual and not loss.perceptual_weights:
      raise ValueError("tokenizer.loss.perceptual_weight > 0 needs "
                       "tokenizer.loss.perceptual_weights, the path of an LPIPS .npz file")
    if cfg.train.ema_decay > 0:
      raise ValueError(
          "tokenizer.train.ema_decay must be 0: the codebooks are fitted to the trained "
          "encoder's outputs, so an averaged encoder would not match them")
    if not 0.0 <= cfg.quantizer.dropout_prob <= 1.0:
      raise ValueError(f"tokenizer.quantizer.dropout_prob must be in [0, 1], got "
                       f"{cfg.quantizer.dropout_prob}")
    self.discriminator = losses.PatchDiscriminator(
        channels=loss.disc_channels, num_layers=loss.disc_layers)

  @functools.cached_property
  def _constants(self):
    """Read on first use (training), so that loading a trained tokenizer for inference
    needs no LPIPS file."""
    loss = self.cfg.loss
    return ({"lpips": losses.load_lpips_params(loss.perceptual_weights)}
            if self.use_perceptual else {})

  def constants(self):
    return self._constants

  def inputs(self, batch: dict) -> jax.Array:
    """The autoencoder's input of a batch: images as floats in [-1, 1]."""
    return image_utils.to_float(batch["image"])

  def quality(self, reconstruction: jax.Array, x: jax.Array) -> dict:
    """Train metrics of a reconstruction of the input ``x``: mean PSNR (dB)."""
    return {"psnr": jnp.mean(image_utils.psnr(jnp.clip(reconstruction, -1, 1), x))}

  def init(self, rng, batch):
    ae_key, book_key, disc_key = jax.random.split(rng, 3)
    x = self.inputs(batch)
    params = {"autoencoder": self.tok.autoencoder.init(ae_key, x)["params"]}
    if self.use_gan:
      params["discriminator"] = self.discriminator.init(disc_key, x)["params"]
    codebook = rvq.CodebookState.create(self.tok.init_codebooks(book_key))
    return params, {"codebook": codebook}

  def data_init(self, params, model_state, batch, rng):
    q = self.cfg.quantizer
    if not q.kmeans_init:
      return model_state
    z = self.tok.encode_latents(params["autoencoder"], self.inputs(batch))
    books = rvq.kmeans_codebooks(z.reshape(-1, z.shape[-1]), q.depth, q.codebook_size,
                                 q.shared_codebook, q.kmeans_iters, rng)
    return {"codebook": rvq.CodebookState.create(books)}

  def train_depths(self, rng: jax.Array, batch_size: int) -> jax.Array:
    """Per-example depth used this step ``[B]``: D, or with probability ``dropout_prob`` a
    uniform depth in 1..D (quantizer dropout, so every depth prefix decodes)."""
    depth = self.tok.depth
    drop_key, depth_key = jax.random.split(rng)
    dropped = jax.random.bernoulli(drop_key, self.cfg.quantizer.dropout_prob, (batch_size,))
    random_depth = jax.random.randint(depth_key, (batch_size,), 1, depth + 1)
    return jnp.where(dropped, random_depth, depth)

  def loss_and_grads(self, params, model_state, constants, batch, rng, step):
    cfg, tok = self.cfg, self.tok
    codebook: rvq.CodebookState = model_state["codebook"]
    depth_key, restart_key = jax.random.split(rng)
    x = self.inputs(batch)
    prefix = self.train_depths(depth_key, x.shape[0])

    def generator_loss(ae_params):
      z = tok.encode_latents(ae_params, x)
      q = rvq.quantize(jax.lax.stop_gradient(z), codebook.codebooks, depth=tok.depth)
      per_example = prefix.reshape((-1,) + (1,) * (q.codes.ndim - 2))  # [B, 1, ...]
      mask = rvq.depth_mask(tok.depth, per_example, q.codes.shape[:-1])
      cumulative = jax.lax.stop_gradient(
          rvq.cumulative_embeddings(q.codes, codebook.codebooks))  # [B,h,w,D,d]
      # RQ-VAE commitment: every used depth's partial sum should stay close to z.
      commit_err = jnp.mean(jnp.square(z[..., None, :] - cumulative), axis=-1)
      commitment = jnp.sum(commit_err * mask) / jnp.sum(mask)
      z_hat = jnp.sum(jnp.where(mask[..., None], rvq.embed(q.codes, codebook.codebooks), 0.0),
                      axis=-2)
      x_hat = tok.autoencoder.apply({"params": ae_params}, z + jax.lax.stop_gradient(z_hat - z),
                                    method=autoencoder.AutoEncoder.decode)
      recon = losses.reconstruction_loss(x, x_hat, cfg.loss.recon)
      total = cfg.loss.recon_weight * recon + cfg.quantizer.commitment_weight * commitment
      metrics = {"recon": recon, "commitment": commitment, **self.quality(x_hat, x)}
      if self.use_perceptual:
        perceptual = losses.perceptual_loss(constants["lpips"], x, x_hat)
        total += cfg.loss.perceptual_weight * perceptual
        metrics["perceptual"] = perceptual
      if self.use_gan:
        logits = self.discriminator.apply({"params": params["discriminator"]}, x_hat)
        g_loss = losses.hinge_g_loss(logits)
        total += losses.gan_weight_at(step, cfg.loss.gan_weight, cfg.loss.gan_start_step) * g_loss
        metrics["g_loss"] = g_loss
      return total, (q, mask, x_hat, metrics)

    (loss, (q, mask, x_hat, metrics)), ae_grads = jax.value_and_grad(
        generator_loss, has_aux=True)(params["autoencoder"])
    grads = {"autoencoder": ae_grads}
    if self.use_gan:
      d_loss, grads["discriminator"] = jax.value_and_grad(self._discriminator_loss)(
          params["discriminator"], x, jax.lax.stop_gradient(x_hat), step)
      metrics["d_loss"] = d_loss
      loss = loss + d_loss

    new_codebook, codebook_metrics = self.update_codebook(codebook, q, mask, restart_key)
    metrics.update(codebook_metrics)
    return loss, grads, {"codebook": new_codebook}, metrics

  def _discriminator_loss(self, disc_params, real, fake, step):
    apply = lambda im: self.discriminator.apply({"params": disc_params}, im)
    active = (step >= self.cfg.loss.gan_start_step).astype(jnp.float32)
    return active * losses.hinge_d_loss(apply(real), apply(fake))

  def update_codebook(self, codebook: rvq.CodebookState, q: rvq.Quantized, mask: jax.Array,
                      rng: jax.Array):
    """EMA update on the global batch, then dead-code restart; returns the new state and
    per-depth usage / perplexity and per-book dead-code counts."""
    qc, depth, dim = self.cfg.quantizer, self.tok.depth, self.tok.latent_dim
    residuals = q.residuals.reshape(-1, depth, dim)
    codes, mask = q.codes.reshape(-1, depth), mask.reshape(-1, depth)
    counts, sums = rvq.batch_statistics(residuals, codes, mask, self.tok.num_books,
                                        self.tok.codebook_size)
    codebook = rvq.ema_update(codebook, counts, sums, qc.ema_decay, qc.ema_eps)
    if self.tok.num_books == 1:  # a shared book restarts from residuals of every depth
      residuals, restart_mask = residuals.reshape(-1, 1, dim), mask.reshape(-1, 1)
    else:
      restart_mask = mask
    codebook, dead = rvq.restart_dead_codes(codebook, residuals, restart_mask,
                                            qc.dead_code_threshold, rng)
    usage = rvq.code_usage_metrics(codes, mask, self.tok.codebook_size)
    metrics = {}
    for j in range(depth):
      metrics[f"quantizer/usage_d{j + 1}"] = usage["usage"][j]
      metrics[f"quantizer/perplexity_d{j + 1}"] = usage["perplexity"][j]
    for c in range(self.tok.num_books):
      metrics[f"quantizer/dead_codes_b{c + 1}"] = dead[c].astype(jnp.float32)
    return codebook, metrics

  def eval_step(self, params, model_state, constants, batch):
    del constants
    valid = batch["valid"].astype(jnp.float32)
    psnr, ssim = prefix_quality(self.tok, params["autoencoder"],
                                model_state["codebook"].codebooks, batch["image"])  # [D, B]
    sums = {f"psnr_d{j + 1}": jnp.sum(psnr[j] * valid) for j in range(self.tok.depth)}
    if ssim is not None:
      sums.update({f"ssim_d{j + 1}": jnp.sum(ssim[j] * valid) for j in range(self.tok.depth)})
    sums["count"] = jnp.sum(valid)
    return sums
