"""The compiled image sampler every image stage and the API draw through: any generator
family's tokens, decoded by the tokenizer, one compiled batch shape."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.codec.tokenizer import TokenizerTask
from resgen_jax.generator.task import TokenTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.utils import images as image_utils


def decode_prefix(tok_task: TokenizerTask, ae_params, codebooks, codes: jax.Array) -> jax.Array:
  """Images ``[B,H,W,C]`` (floats in [-1, 1]) of codes ``[B,h,w,D']`` of the first
  ``D' <= D`` depths (a generator of a depth prefix, ``generator.token_depth``)."""
  depth = codes.shape[-1]
  padded = jnp.pad(codes, ((0, 0),) * 3 + ((0, tok_task.tok.depth - depth),))
  return tok_task.tok.decode(ae_params, codebooks, padded, prefix=depth)


def make_image_sampler(config, tok_task: TokenizerTask, gen_task: TokenTask,
                       mesh) -> Callable:
  """A jitted ``(gen_params, gen_state, ae_params, codebooks, labels [B], rng) ->
  (images float [B,H,W,C], codes [B,h,w,D], reveal_step [B,h,w,D])`` for any generator
  family (``reveal_step``: the network call that drew each token)."""
  h, w = tok_task.tok.grid_shape(config.data.image_size)

  def draw(gen_params, gen_state, ae_params, codebooks, labels, rng):  # labels batch-sharded
    out = gen_task.sample_tokens(gen_params, gen_state,
                                 rvq.prefix_codebooks(codebooks, gen_task.depth), labels, rng,
                                 config.sampler)
    grid = lambda x: x.reshape(labels.shape[0], h, w, gen_task.depth)
    codes = grid(out.codes)
    return decode_prefix(tok_task, ae_params, codebooks, codes), codes, grid(out.reveal_step)

  # Outputs replicated, so every process can read the whole batch.
  return jax.jit(draw, out_shardings=mesh_lib.replicated(mesh))


def compiled_image_sampler(config, tok_task: TokenizerTask, tok_state, gen_task: TokenTask,
                           gen_state, mesh) -> Callable:
  """``(gen_state, labels int [n], index) -> (images uint8 [n,H,W,C], codes [n,h,w,D],
  reveal_step [n,h,w,D])`` for ``n <= sampler.batch_size``, compiled here for that one
  batch shape (shorter batches are padded), so calls time sampling alone. Batch ``index`` draws from
  ``fold_in(key(sampler.seed), index)``; ``gen_state`` may change between calls (the
  training-time proxy) as long as its layout does not."""
  scfg = config.sampler
  mesh_lib.check_batch_size(scfg.batch_size, mesh)
  draw = make_image_sampler(config, tok_task, gen_task, mesh)
  ae_params = tok_state.params["autoencoder"]
  codebooks = tok_state.model_state["codebook"].codebooks
  args = lambda state, padded, index: (
      state.eval_params(), state.model_state, ae_params, codebooks,
      mesh_lib.replicated_host_batch(padded.astype(np.int32), mesh),
      jax.random.fold_in(jax.random.key(scfg.seed), index))
  compiled = draw.lower(*args(gen_state, np.zeros(scfg.batch_size, np.int32), 0)).compile()

  def sample(state, labels: np.ndarray, index: int):
    if not 0 < len(labels) <= scfg.batch_size:
      raise ValueError(f"{len(labels)} labels for a sampler of batch size {scfg.batch_size}")
    padded = np.pad(labels, (0, scfg.batch_size - len(labels)))  # one compiled shape
    images, codes, steps = compiled(*args(state, padded, index))
    return (image_utils.to_uint8(images)[:len(labels)], np.asarray(codes)[:len(labels)],
            np.asarray(steps)[:len(labels)])

  return sample


def label_batches(labels: np.ndarray, batch_size: int):
  """``(index, labels[first:first + batch_size])`` for the batches of ``labels``."""
  return enumerate(labels[first:first + batch_size]
                   for first in range(0, len(labels), batch_size))
