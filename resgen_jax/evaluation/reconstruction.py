"""How well a trained tokenizer's codes serve, per depth prefix: codebook usage and the
reconstruction Frechet distance (rFID with the FID Inception), over batches of a split."""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from resgen_jax.codec import rvq
from resgen_jax.codec.tokenizer import TokenizerTask, prefix_reconstructions
from resgen_jax.evaluation import features as features_lib
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption
from resgen_jax.utils import images as image_utils


def codebook_usage(task: TokenizerTask, state, batches: Iterable[dict], mesh) -> dict:
  """How the codes of ``batches`` use each depth's codebook: the fraction of codes used
  (``usage_by_depth``) and the perplexity ``exp(entropy)`` of their frequencies
  (``perplexity_by_depth``, at most the codebook size)."""
  encode = jax.jit(task.tok.encode, out_shardings=mesh_lib.replicated(mesh))
  params = state.params["autoencoder"]
  books = state.model_state["codebook"].codebooks
  size, depth = task.tok.codebook_size, task.tok.depth
  counts = np.zeros((depth, size), np.int64)
  for local in preemption.checked(batches):
    batch = mesh_lib.global_batch(local, mesh)
    codes = np.asarray(encode(params, books, batch["image"]))  # [B, h, w, D], whole
    valid = mesh_lib.to_host(batch["valid"], mesh)
    for j in range(depth):
      counts[j] += np.bincount(codes[valid][..., j].ravel(), minlength=size)
  usage = rvq.usage_from_counts(counts.astype(np.float64), xp=np)
  return {"usage_by_depth": [float(u) for u in usage["usage"]],
          "perplexity_by_depth": [float(p) for p in usage["perplexity"]]}


def reconstruction_fid(task: TokenizerTask, state, extractor: features_lib.Extractor,
                       batches: Iterable[dict], mesh) -> list:
  """Frechet distance between the reconstructions from each depth prefix and the images of
  ``batches`` themselves, in the extractor's features (rFID with the FID Inception). -> a
  list of D floats. Reconstructions are scored a batch at a time."""
  reconstruct = jax.jit(lambda p, b, images: prefix_reconstructions(task.tok, p, b, images),
                        out_shardings=mesh_lib.replicated(mesh))
  params, books = state.params["autoencoder"], state.model_state["codebook"].codebooks
  real, recon = [], [[] for _ in range(task.tok.depth)]
  for local in preemption.checked(batches):
    batch = mesh_lib.global_batch(local, mesh)
    valid = mesh_lib.to_host(batch["valid"], mesh)
    images = mesh_lib.to_host(batch["image"], mesh)[valid]
    recons = image_utils.to_uint8(reconstruct(params, books, batch["image"]))  # [D, B, ...]
    real.append(extractor(images)[0])
    for j in range(task.tok.depth):
      recon[j].append(extractor(recons[j][valid])[0])
  reference = features_lib.Reference.from_features(np.concatenate(real))
  return [reference.frechet_distance(np.concatenate(r)) for r in recon]
