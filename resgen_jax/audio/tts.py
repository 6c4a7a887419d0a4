"""Zero-shot text-to-speech with ResGen: the work of the speech stages of a run (``data.name``
a speech source: ``espeak``, ``manifest`` or ``librispeech``; ``audio/stages.py`` is their
table).

The same generator and sampler as for images; only the tokenizer, the conditioning and the
data differ:

  ``tokenizer``: trains the speech codec (``audio/codec.py``) on random mel crops and
      reports the log-mel error of every depth prefix and codebook usage
      (``DIR/tokenizer/results.json``).
  ``encode``: encodes every utterance of the train and eval splits into token frames
      ``[L_i, D]`` with their transcripts and speakers (``DIR/tokens/speech_<split>.npz``;
      the format and the generator's batches over it: ``audio/speech_tokens.py``).
  ``generator``: trains ResGen on them, conditioned on the transcript (``generator.model.
      text_mode``), with padding masks for the variable lengths and training prompts
      (``generator.loss.prompt_prob``).
  ``synthesize``: zero-shot synthesis (``--mode=synthesize``): the prompt's tokens are given
      to the sampler as known tokens, the text is ``prompt_text + " " + text``, and the
      length comes from the prompt's speaking rate (frames per text token) or
      ``synth.seconds``; writes WAV files (``audio/synthesis.py``).
  ``evaluate``: the paper's two zero-shot tasks on the eval split, exported for the common
      evaluation scripts, with offline proxies (``audio/evaluation.py``).

This module holds the codec, encode and generator stages' bodies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import corpus, frontend, speech_tokens
from resgen_jax.audio import text as text_lib
from resgen_jax.codec import rvq, token_cache
from resgen_jax.data import pipeline as data_pipeline
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption, trainer
from resgen_jax.utils import files

RESULTS_FILE = "results.json"
ENCODE_BATCH = 32  # utterances per codec call in the codec's report


# ----------------------------------------------------------------------------------------
# Codec stage
# ----------------------------------------------------------------------------------------


def make_codec_task(config) -> codec_lib.SpeechCodecTask:
  return codec_lib.SpeechCodecTask(config.tokenizer, config.audio)


def split_mels(config, split: str):
  """``(utterances, log-mels)`` of a split (``corpus.load_utterances``)."""
  utterances = corpus.load_utterances(config.data, config.audio, split)
  return utterances, codec_lib.utterance_mels([u.wave for u in utterances], config.audio)


def codec_eval_pass(config, log_mels, max_examples=None) -> Callable:
  crops = codec_lib.first_crops(log_mels, config.tokenizer.crop_frames, config.audio)
  batch = config.tokenizer.train.eval_batch_size
  return lambda: codec_lib.crop_eval_batches(crops, batch, jax.process_index(),
                                             jax.process_count(), max_examples)


def run_codec(config, workdir: str, mesh) -> None:
  """Trains the speech codec, then writes its report (once)."""
  tcfg = config.tokenizer.train
  if tcfg.grad_accum_steps != 1:
    raise ValueError(f"tokenizer.train.grad_accum_steps must be 1 (got "
                     f"{tcfg.grad_accum_steps}): the EMA codebook update needs whole batches")
  mesh_lib.check_batch_size(tcfg.batch_size, mesh)
  mesh_lib.check_batch_size(tcfg.eval_batch_size, mesh)
  task = make_codec_task(config)
  _, train_mels = split_mels(config, config.data.train_split)
  _, eval_mels = split_mels(config, config.data.eval_split)
  train_iter = codec_lib.MelCrops(train_mels, config.tokenizer.crop_frames, tcfg.batch_size,
                                  config.seed, config.audio, jax.process_index(),
                                  jax.process_count())
  result = trainer.train_and_evaluate(
      task, tcfg, workdir, train_iter,
      codec_eval_pass(config, eval_mels, tcfg.eval_examples or None),
      mesh, config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  if result.preempted:
    raise SystemExit(preemption.EXIT_CODE)
  write_codec_report(task, result.state, config, workdir, eval_mels, mesh)


def write_codec_report(task, state, config, workdir: str, eval_mels, mesh) -> dict:
  """Log-mel L1 error (nats) of every depth prefix on the eval split's first crops, and
  codebook usage / perplexity per depth over its whole utterances."""
  path = os.path.join(workdir, task.name, RESULTS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  metrics = trainer.evaluate(jax.jit(trainer.make_eval_step(task)), state, task.constants(),
                             codec_eval_pass(config, eval_mels)(), mesh)
  codes = codec_lib.encode_utterances(task.tok, state.params["autoencoder"],
                                      state.model_state["codebook"].codebooks, eval_mels,
                                      ENCODE_BATCH)
  counts = np.zeros((task.tok.depth, task.tok.codebook_size))
  for c in codes:
    for j in range(task.tok.depth):
      counts[j] += np.bincount(c[:, j], minlength=task.tok.codebook_size)
  usage = rvq.usage_from_counts(counts, xp=np)
  report = {"step": int(state.step), "eval_split": config.data.eval_split,
            "mel_l1_by_depth": [metrics[f"mel_l1_d{j + 1}"] for j in range(task.tok.depth)],
            "usage_by_depth": [float(u) for u in usage["usage"]],
            "perplexity_by_depth": [float(p) for p in usage["perplexity"]]}
  if jax.process_index() == 0:
    files.save_json(path, report)
  logging.info("codec mel_l1_by_depth: %s", ", ".join(f"{v:.3f}" for v in
                                                      report["mel_l1_by_depth"]))
  return report


def load_codec(config, workdir: str, mesh):
  """``(task, state)`` of the trained codec."""
  task = make_codec_task(config)
  crop = config.tokenizer.crop_frames
  example = {"mel": jnp.zeros((mesh_lib.batch_shards(mesh), crop, config.audio.n_mels))}
  state = trainer.load_trained_state(task, config.tokenizer.train, workdir, example, mesh,
                                     config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  return task, state


# ----------------------------------------------------------------------------------------
# Encode stage: whole utterances -> token frames, with their text and speaker
# ----------------------------------------------------------------------------------------


def run_encode(config, workdir: str, mesh) -> None:
  """Encodes the train and eval splits' utterances into the token cache ``DIR/tokens``
  (``audio/speech_tokens.py``): batches of ``tokenizer.train.eval_batch_size`` utterances
  sharded over the mesh, each process writing its rows a chunk of
  ``tokenizer.encode_chunk_batches`` batches at a time, so a preempted encoding resumes
  after its last complete chunk."""
  task, state = load_codec(config, workdir, mesh)
  if int(state.step) < config.tokenizer.train.num_steps:
    raise ValueError(f"the codec in {workdir} has trained {int(state.step)} of "
                     f"{config.tokenizer.train.num_steps} steps; finish its training first")
  codec = task.tok
  meta = speech_tokens.cache_meta(config, codec, int(state.step))
  splits = (config.data.train_split, config.data.eval_split)
  if (speech_tokens.legacy_cached(workdir, splits, meta)
      or token_cache.is_cached(workdir, splits, meta)):
    logging.info("speech tokens already cached in %s",
                 os.path.dirname(speech_tokens.meta_path(workdir)))
    return
  params, books = state.params["autoencoder"], state.model_state["codebook"].codebooks
  host_books = mesh_lib.to_host(books, mesh)
  encode = jax.jit(codec.encode, out_shardings=mesh_lib.batch_sharding(mesh))
  batch = config.tokenizer.train.eval_batch_size
  mesh_lib.check_batch_size(batch, mesh)
  pid, count = jax.process_index(), jax.process_count()
  token_cache.begin_encoding(workdir, meta)
  for split in splits:
    utterances, mels = split_mels(config, split)
    frames = codec.padded_frames(max(m.shape[0] for m in mels) + codec_lib.ENCODE_MARGIN_FRAMES)
    lengths = [codec.latent_frames(m.shape[0]) for m in mels]

    def encode_local(rows):
      codes = mesh_lib.local_rows(encode(params, books, mesh_lib.global_batch(
          {"mel": rows["mel"]}, mesh)["mel"]))
      return speech_tokens.utterance_rows(codes[:, :max(lengths)], rows["index"],
                                          utterances, lengths)

    batches_from = lambda start: speech_tokens.utterance_batches(
        mels, batch, frames, config.audio, start, pid, count)
    start = time.time()
    encoded = token_cache.encode_split(workdir, split, encode_local, batches_from,
                                       codec.codebook_size, config.tokenizer.encode_chunk_batches)
    logging.info("encoded %d %s utterances on process %d in %.1f s", encoded, split, pid,
                 time.time() - start)
  token_cache.write_meta(workdir, meta, host_books)


# ----------------------------------------------------------------------------------------
# Generator stage
# ----------------------------------------------------------------------------------------


def max_positions(config, codec: codec_lib.SpeechCodec) -> int:
  """Token frames the generator handles: ``generator.model.max_positions``, or those of a
  ``data.max_seconds`` clip."""
  if config.generator.model.max_positions:
    return int(config.generator.model.max_positions)
  samples = int(math.ceil(config.data.max_seconds * config.audio.sample_rate))
  return codec.latent_frames(frontend.num_frames(samples, config.audio))


def make_tts_task(config, codebooks: np.ndarray, codec: codec_lib.SpeechCodec) -> GeneratorTask:
  if config.generator.family != "resgen":
    raise ValueError(f"speech is generated by generator.family='resgen' only, got "
                     f"{config.generator.family!r}")
  if config.generator.token_depth:
    raise ValueError("generator.token_depth is an image option (a depth prefix of the cached "
                     "codes); speech generators model every codec depth: leave it at 0")
  tokenizer = text_lib.make_text_tokenizer(config.text)
  return GeneratorTask(config.generator, codebooks, max_positions(config, codec), codec.depth,
                       speech_tokens.SPEECH_CLASSES, text_vocab_size=tokenizer.vocab_size,
                       max_text_length=config.text.max_length)


def generator_setup(config, workdir: str):
  """``(codec, task, tokenizer)`` for the generator of a run with cached speech tokens."""
  codebooks = speech_tokens.load_codebooks(workdir)
  codec = codec_lib.SpeechCodec(config.tokenizer, config.audio)
  return codec, make_tts_task(config, codebooks, codec), text_lib.make_text_tokenizer(
      config.text)


def run_generator(config, workdir: str, mesh) -> None:
  gcfg = config.generator.train
  mesh_lib.check_batch_size(gcfg.batch_size, mesh, gcfg.grad_accum_steps)
  mesh_lib.check_batch_size(gcfg.eval_batch_size, mesh)
  _, task, tokenizer = generator_setup(config, workdir)
  pid, count = jax.process_index(), jax.process_count()
  source = lambda split: speech_tokens.speech_token_source(config, workdir, split,
                                                           task.num_positions, tokenizer)
  train, evaluation = source(config.data.train_split), source(config.data.eval_split)
  train_iter = token_cache.TokenBatches(train, gcfg.batch_size, config.seed, pid, count,
                                        to_batch=speech_tokens.flat_batch)
  eval_pass = lambda: (speech_tokens.flat_batch(b) for b in data_pipeline.sequential_batches(
      evaluation, gcfg.eval_batch_size, pid, count, gcfg.eval_examples or None))
  result = trainer.train_and_evaluate(task, gcfg, workdir, train_iter, eval_pass, mesh,
                                      config.seed,
                                      mesh_lib.ShardingRules.from_config(config.mesh))
  if result.preempted:
    raise SystemExit(preemption.EXIT_CODE)


def load_generator(config, workdir: str, mesh):
  """``(codec, codec_state, task, state, tokenizer)`` of a trained TTS run."""
  codec_task, codec_state = load_codec(config, workdir, mesh)
  _, task, tokenizer = generator_setup(config, workdir)
  rows = mesh_lib.example_rows(mesh)
  example = mesh_lib.global_batch({
      "codes": np.zeros((rows, task.num_positions, task.depth), np.int32),
      "label": np.zeros((rows,), np.int32),
      "valid_positions": np.ones((rows, task.num_positions), bool),
      "text": np.zeros((rows, config.text.max_length), np.int32)}, mesh)
  state = trainer.load_trained_state(task, config.generator.train, workdir, example, mesh,
                                     config.seed, mesh_lib.ShardingRules.from_config(config.mesh))
  return codec_task.tok, codec_state, task, state, tokenizer
