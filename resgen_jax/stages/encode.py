"""The ``encode`` stage of an image run: the train and eval splits encoded once by the
trained tokenizer into the token cache ``DIR/tokens/`` the generator trains on."""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from resgen_jax import data as data_lib
from resgen_jax.codec import token_cache
from resgen_jax.stages import tokenizer
from resgen_jax.train import mesh as mesh_lib


def run(config, workdir: str, mesh) -> None:
  """Encodes the train and eval splits with the trained tokenizer into ``DIR/tokens``, a
  chunk of ``tokenizer.encode_chunk_batches`` batches at a time: a preempted or killed
  encoding resumes after its last complete chunk (``token_cache``)."""
  task, state = tokenizer.load(config, workdir, mesh)
  passes = {split: tokenizer.eval_pass(config, split)
            for split in (config.data.train_split, config.data.eval_split)}
  if int(state.step) < config.tokenizer.train.num_steps:
    raise ValueError(
        f"the tokenizer in {workdir} has trained {int(state.step)} of "
        f"{config.tokenizer.train.num_steps} steps; finish its training (--mode=train) "
        f"before encoding")
  h, w = task.tok.grid_shape(config.data.image_size)
  meta = {"grid": [h, w], "depth": task.tok.depth, "codebook_size": task.tok.codebook_size,
          "tokenizer_step": int(state.step), "image_size": config.data.image_size,
          "process_count": jax.process_count(),
          "data": {split: data_lib.fingerprint(config.data, split) for split in passes}}
  check_token_data(config, workdir, meta["data"])
  if token_cache.is_cached(workdir, tuple(passes), meta):
    logging.info("tokens already cached in %s", os.path.join(workdir, token_cache.TOKENS_DIR))
    return
  params, books = state.params["autoencoder"], state.model_state["codebook"].codebooks
  # Whole on every process (an FSDP-split codebook spans hosts), for tokens/codebooks.npz.
  host_books = mesh_lib.to_host(books, mesh)
  encode = jax.jit(task.tok.encode, out_shardings=mesh_lib.batch_sharding(mesh))

  def encode_local(batch):
    codes = encode(params, books, mesh_lib.global_batch({"image": batch["image"]}, mesh)["image"])
    return {"codes": mesh_lib.local_rows(codes), "labels": np.asarray(batch["label"], np.int32)}

  token_cache.begin_encoding(workdir, meta)
  for split, batches_from in passes.items():
    start = time.time()
    count = token_cache.encode_split(workdir, split, encode_local, batches_from,
                                     task.tok.codebook_size,
                                     config.tokenizer.encode_chunk_batches)
    seconds = time.time() - start
    logging.info("encoded %d %s examples on process %d in %.1f s (%.1f images/s)", count,
                 split, jax.process_index(), seconds, count / max(seconds, 1e-9))
  token_cache.write_meta(workdir, meta, host_books)


def check_token_data(config, workdir: str, current=None) -> None:
  """Refuses a token cache encoded from other data than ``config.data`` now names (data
  paths may change on resume, the data may not): the generator would train on the old
  codes and be scored against the new held-out images. ``current``: the fingerprints
  already computed. A cache from before fingerprints were recorded passes with a warning,
  and a workdir without one (samples evaluated on their own) has nothing to check."""
  if not os.path.exists(token_cache.meta_path(workdir)):
    return
  meta, _ = token_cache.load_meta(workdir)
  saved = meta.get("data")
  if saved is None:
    logging.warning("%s does not record which data it was encoded from; it is used as it is",
                    token_cache.meta_path(workdir))
    return
  current = current or {split: data_lib.fingerprint(config.data, split) for split in saved}
  changed = [split for split in saved if saved[split] != current.get(split)]
  if changed:
    raise ValueError(
        f"the token cache {os.path.dirname(token_cache.meta_path(workdir))} was encoded from "
        f"other data than data.path / data.eval_path now give (splits {changed}: "
        f"{[saved[s] for s in changed]} then, {[current.get(s) for s in changed]} now); "
        f"point the data fields back, or remove the tokens folder to encode the new data")
