"""The Python API: load a trained run from its workdir and sample, inpaint, encode and decode.

    from resgen_jax import api

    run = api.load("/tmp/digits")                  # an ImageRun (a SpeechRun for speech)
    out = run.sample(labels=[3] * 8, steps=16, cfg_scale=2.0, seed=0)
    out.images                                     # uint8 [8, 16, 16, 1]
    out.codes, out.reveal_step                     # int32 [8, 4, 4, D]: tokens, call that drew each
    frames = run.reveal_frames(out)                # uint8 [T + 1, 8, 16, 16, 1], one per call
    codes = run.encode(images)                     # uint8 [N, H, W, C] -> int32 [N, h, w, D]
    recon = run.decode(codes, depth=2)             # from the first 2 depths -> uint8 images
    filled = run.inpaint(images, mask, labels)     # mask True: pixels (or positions) to draw

Loading needs only the workdir (``config.json``, the checkpoints, the token cache's
codebooks, ``tokenizer/image_spec.json``): no data, no LPIPS file; optimizer and
discriminator states are not read, and a run trained with FSDP on a pod loads on one CPU or
GPU. Sampling goes through the stages' compiled sampler (the ``sample`` stage's code):
with the config's ``sampler.batch_size`` and labels in the stage's order, ``sample``
returns the stage's images.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resgen_jax import stages
from resgen_jax.audio import api as speech_api
from resgen_jax.codec import rvq
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.runs import (  # part of the API; shared with audio/api.py
    check_trained, default_mesh, read_run_config, sampler_config)
from resgen_jax.train import trainer
from resgen_jax.utils import files
from resgen_jax.utils import images as image_utils

# Sampler fields ``sample`` and ``inpaint`` take as keyword arguments (None: the run's).
SAMPLER_ARGS = ("steps", "cfg_scale", "temperature", "top_p")


@dataclasses.dataclass(frozen=True)
class Samples:
  """Images drawn by a run, with their tokens and how they were revealed.

  Attributes:
    images: uint8 ``[N, H, W, C]``.
    codes: int32 ``[N, h, w, D]``, every token.
    labels: int32 ``[N]``, the requested classes.
    reveal_step: int32 ``[N, h, w, D]``: the network call (1..T; the raster index for the
      autoregressive family) that drew each token, 0 for tokens given (inpainting context).
  """
  images: np.ndarray
  codes: np.ndarray
  labels: np.ndarray
  reveal_step: np.ndarray


def load(workdir: str, mesh=None):
  """The trained run in ``workdir``: an :class:`ImageRun`, or a ``SpeechRun`` for a speech
  workdir (see :mod:`resgen_jax.audio.api`). ``mesh``: default :func:`default_mesh`."""
  config = read_run_config(workdir)
  if config.modality == "speech":
    return speech_api.SpeechRun(workdir, config, mesh)
  return ImageRun(workdir, config, mesh)


class ImageRun:
  """A trained image run: its tokenizer and (when trained) its generator, EMA weights.

  Args:
    workdir: the run's directory.
    config: its config (default: read from ``DIR/config.json``).
    mesh: devices to run on (default :func:`default_mesh`).
  """

  def __init__(self, workdir: str, config: Optional[ml_collections.ConfigDict] = None,
               mesh=None):
    self.workdir = workdir
    self.config = read_run_config(workdir) if config is None else config
    if self.config.modality == "speech":
      raise ValueError(f"{workdir} is a speech run (modality 'speech', data.name="
                       f"{self.config.data.name!r}); "
                       f"load it with api.load or audio.api.SpeechRun")
    self.mesh = default_mesh(self.config) if mesh is None else mesh
    check_trained(workdir, "tokenizer")
    self.tok_task, self.tok_state = stages.tokenizer.load(self.config, workdir, self.mesh)
    self.tokenizer = self.tok_task.tok
    self.image_size = self.config.data.image_size
    self.image_channels = self.tokenizer.autoencoder.image_channels
    self.num_classes = self.config.data.num_classes
    self._ae_params = self.tok_state.params["autoencoder"]
    self._codebooks = self.tok_state.model_state["codebook"].codebooks
    self._encode = jax.jit(self.tokenizer.encode)
    self._decode = jax.jit(lambda p, b, codes: stages.sampling.decode_prefix(self.tok_task, p, b, codes))
    self._samplers: Dict[str, Callable] = {}
    self._infillers: Dict[str, Callable] = {}
    self.gen_task = self.gen_state = None
    if trainer.latest_checkpoint_step(os.path.join(workdir, "generator")) is not None:
      self.gen_task, self.gen_state = stages.generator.load(self.config, workdir, self.mesh)

  @property
  def grid_shape(self):
    return self.tokenizer.grid_shape(self.image_size)

  # -- tokenizer -------------------------------------------------------------------------

  def check_images(self, images, name: str = "images") -> np.ndarray:
    """``images`` as uint8 ``[N, H, W, C]`` of the run's size, or a ValueError naming them."""
    images = np.asarray(images)
    want = (self.image_size, self.image_size, self.image_channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f"{name} must be uint8 [N, {', '.join(map(str, want))}] (this run's "
                       f"images), got {images.dtype} {images.shape}")
    return images

  def encode(self, images) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> int32 codes ``[N, h, w, D]``."""
    return np.asarray(self._encode(self._ae_params, self._codebooks, self.check_images(images)))

  def decode(self, codes, depth: Optional[int] = None) -> np.ndarray:
    """int codes ``[N, h, w, D']`` (``D' <= D``; :data:`rvq.UNUSED_CODE` entries add
    nothing) -> uint8 images ``[N, H, W, C]`` from their first ``depth`` depths (all)."""
    codes = np.asarray(codes)
    h, w = self.grid_shape
    full = self.tokenizer.depth
    if (codes.ndim != 4 or codes.shape[1:3] != (h, w) or not 1 <= codes.shape[-1] <= full
        or not np.issubdtype(codes.dtype, np.integer)):
      raise ValueError(f"codes must be integers [N, {h}, {w}, D'] with 1 <= D' <= {full}, "
                       f"got {codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < rvq.UNUSED_CODE or
                       codes.max() >= self.tokenizer.codebook_size):
      raise ValueError(f"codes must lie in [0, {self.tokenizer.codebook_size}) (or be "
                       f"{rvq.UNUSED_CODE}, unused), got [{codes.min()}, {codes.max()}]")
    depth = codes.shape[-1] if depth is None else depth
    if not 1 <= depth <= codes.shape[-1]:
      raise ValueError(f"depth must be in [1, {codes.shape[-1]}], got {depth}")
    return image_utils.to_uint8(self._decode(self._ae_params, self._codebooks,
                                             jnp.asarray(codes[..., :depth], jnp.int32)))

  # -- generator -------------------------------------------------------------------------

  def _require_generator(self) -> None:
    if self.gen_task is None:
      check_trained(self.workdir, "generator")

  def check_labels(self, labels=None, count: Optional[int] = None) -> np.ndarray:
    """int32 ``[N]``: ``labels``, or ``count`` labels cycling over the classes."""
    if (labels is None) == (count is None):
      raise ValueError("give labels or count, not both or neither")
    if labels is None:
      if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
      return (np.arange(count) % self.num_classes).astype(np.int32)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} "
                       f"{labels.shape}")
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f"labels must lie in [0, {self.num_classes}) (this run's classes), got "
                       f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)

  def sampler_config(self, count: int, batch_size: Optional[int] = None, seed: int = 0,
                     **overrides) -> ml_collections.ConfigDict:
    """See :func:`sampler_config`."""
    return sampler_config(self.config, self.mesh, count, batch_size, seed, **overrides)

  def sample(self, labels=None, count: Optional[int] = None, *, steps: Optional[int] = None,
             cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
             top_p: Optional[float] = None, seed: int = 0, batch_size: Optional[int] = None,
             **sampler_settings) -> Samples:
    """Class-conditional samples.

    Args:
      labels: int classes ``[N]``; or ``count``: N images cycling over the classes.
      steps, cfg_scale, temperature, top_p: sampler settings (None: the run's config);
        ``**sampler_settings`` sets any other ``config.sampler`` field.
      seed: batch ``i`` draws from ``fold_in(key(seed), i)``, as the sample stage does.
      batch_size: images per compiled call.
    Returns:
      :class:`Samples`.
    """
    self._require_generator()
    labels = self.check_labels(labels, count)
    config = self.sampler_config(len(labels), batch_size, seed, steps=steps,
                                 cfg_scale=cfg_scale, temperature=temperature, top_p=top_p,
                                 **sampler_settings)
    key = files.settings_hash(config.sampler.to_dict())
    if key not in self._samplers:
      self._samplers[key] = stages.sampling.compiled_image_sampler(
          config, self.tok_task, self.tok_state, self.gen_task, self.gen_state, self.mesh)
    draw = self._samplers[key]
    parts = [draw(self.gen_state, chunk, index)
             for index, chunk in stages.sampling.label_batches(labels, config.sampler.batch_size)]
    images, codes, steps_drawn = (np.concatenate(p) for p in zip(*parts))
    return Samples(images=images, codes=codes, labels=labels, reveal_step=steps_drawn)

  def reveal_frames(self, samples: Samples, at: Optional[Sequence[int]] = None) -> np.ndarray:
    """The images as they stood after each network call: uint8 ``[len(at), N, H, W, C]``,
    frame ``t`` decoded from the tokens with ``reveal_step <= t`` (``at``: default
    ``0 .. max(reveal_step)``; frame 0 holds only the given tokens)."""
    at = range(int(samples.reveal_step.max()) + 1) if at is None else at
    return np.stack([self.decode(np.where(samples.reveal_step <= t, samples.codes,
                                          rvq.UNUSED_CODE)) for t in at])

  def token_mask(self, mask) -> np.ndarray:
    """bool ``[N, h, w]`` positions to draw, from ``mask`` of pixels ``[N, H, W]`` (a
    position is drawn when any of its pixels is masked) or of positions ``[N, h, w]``."""
    mask = np.asarray(mask)
    h, w = self.grid_shape
    size = self.image_size
    if mask.dtype != bool or mask.ndim != 3 or mask.shape[1:] not in ((size, size), (h, w)):
      raise ValueError(f"mask must be bool [N, {size}, {size}] (pixels) or [N, {h}, {w}] "
                       f"(token positions), True where to draw; got {mask.dtype} {mask.shape}")
    if mask.shape[1:] == (h, w):
      return mask
    f = self.tokenizer.downsample
    return mask.reshape(mask.shape[0], h, f, w, f).any(axis=(2, 4))

  def _infiller(self, config) -> Callable:
    """Jitted ``(images, hidden [N, L], labels, rng) -> (images float, codes, reveal_step)``."""
    key = files.settings_hash(config.sampler.to_dict())
    if key not in self._infillers:
      task, depth = self.gen_task, self.gen_task.depth
      books = rvq.prefix_codebooks(self._codebooks, depth)

      def infill(gen_params, gen_state, ae_params, codebooks, images, hidden, labels, rng):
        codes = self.tokenizer.encode(ae_params, codebooks, images)[..., :depth]
        grid = codes.shape[:-1]
        flat = codes.reshape(codes.shape[0], -1, depth)
        known = jnp.broadcast_to(~hidden[..., None], flat.shape)
        out = task.infill(gen_params, gen_state, books, flat, known,
                          jnp.ones(flat.shape[:2], bool), labels, rng, config.sampler)
        new = out.codes.reshape(*grid, depth)
        return (stages.sampling.decode_prefix(self.tok_task, ae_params, codebooks, new), new,
                out.reveal_step.reshape(*grid, depth))

      self._infillers[key] = jax.jit(infill)
    return self._infillers[key]

  def inpaint(self, images, mask, labels, *, steps: Optional[int] = None,
              cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
              top_p: Optional[float] = None, seed: int = 0, **sampler_settings) -> Samples:
    """Encodes ``images``, keeps every token of the positions ``mask`` leaves visible and
    draws the rest for the classes ``labels``.

    Args:
      images: uint8 ``[N, H, W, C]``.
      mask: bool, True where to draw: pixels ``[N, H, W]`` or token positions ``[N, h, w]``.
      labels: int classes ``[N]``.
      steps, cfg_scale, temperature, top_p, seed, **sampler_settings: as :meth:`sample`.
    Returns:
      :class:`Samples`; ``reveal_step`` is 0 at the kept positions.
    """
    self._require_generator()
    if not isinstance(self.gen_task, GeneratorTask):
      raise ValueError(f"generator.family={self.config.generator.family!r} cannot inpaint: "
                       f"only the step samplers (resgen, direct) fill given tokens")
    images = self.check_images(images)
    hidden = self.token_mask(mask)
    labels = self.check_labels(labels)
    if not len(images) == len(hidden) == len(labels):
      raise ValueError(f"images, mask and labels must have one entry per image, got "
                       f"{len(images)}, {len(hidden)} and {len(labels)}")
    config = self.sampler_config(len(labels), None, seed, steps=steps,
                                 cfg_scale=cfg_scale, temperature=temperature, top_p=top_p,
                                 **sampler_settings)
    out, codes, reveal = self._infiller(config)(
        self.gen_state.eval_params(), self.gen_state.model_state, self._ae_params,
        self._codebooks, jnp.asarray(images), jnp.asarray(hidden.reshape(len(hidden), -1)),
        jnp.asarray(labels), jax.random.key(seed))
    return Samples(images=image_utils.to_uint8(out), codes=np.asarray(codes), labels=labels,
                   reveal_step=np.asarray(reveal))
