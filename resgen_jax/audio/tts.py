"""Zero-shot text-to-speech with ResGen: the work of the speech stages of a run (``data.name``
a speech source: ``espeak``, ``manifest`` or ``librispeech``; ``audio/stages.py`` is their
table).

The same generator and sampler as for images; only the tokenizer, the conditioning and the
data differ:

  ``tokenizer``: trains the speech codec (``audio/codec.py``) on random mel crops and
      reports the log-mel error of every depth prefix and codebook usage
      (``DIR/tokenizer/results.json``).
  ``encode``: encodes every utterance of the train and eval splits into token frames
      ``[L_i, D]`` with their transcripts and speakers (``DIR/tokens/speech_<split>.npz``).
  ``generator``: trains ResGen on them, conditioned on the transcript (``generator.model.
      text_mode``), with padding masks for the variable lengths and training prompts
      (``generator.loss.prompt_prob``).
  ``synthesize``: zero-shot synthesis (``--mode=synthesize``): the prompt's tokens are given
      to the sampler as known tokens, the text is ``prompt_text + " " + text``, and the
      length comes from the prompt's speaking rate (frames per text token) or
      ``synth.seconds``; writes WAV files (:func:`run_synthesize`).
  ``evaluate``: the paper's two zero-shot tasks on the eval split, exported for the common
      evaluation scripts, with offline proxies (``audio/evaluation.py``).

Synthesis decodes prompt and generated frames together, vocodes them (Griffin-Lim by
default, :class:`frontend.Vocoder`), and keeps the generated part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import corpus, frontend
from resgen_jax.audio import text as text_lib
from resgen_jax.codec import rvq, token_cache
from resgen_jax.data import pipeline as data_pipeline
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption, trainer
from resgen_jax.utils import files

TOKENS_DIR = "tokens"
SPEECH_META = {"kind": "speech"}  # marks a token cache of speech utterances
SYNTH_DIR = "synth"
RESULTS_FILE = "results.json"
ENCODE_BATCH = 32  # utterances per codec call when encoding a corpus
SPEECH_CLASSES = 1  # the generator's class input is constant for speech (plus the null class)
MANIFEST_COLUMNS = ("prompt_wav", "prompt_text", "text")  # synth.manifest (+ optional name)


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
      task, tcfg, workdir, train_iter, codec_eval_pass(config, eval_mels, tcfg.eval_examples or None),
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


def cache_path(workdir: str, split: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, f"speech_{split}.npz")


def meta_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENS_DIR, "meta.json")


def run_encode(config, workdir: str, mesh) -> None:
  """Encodes the train and eval splits' utterances into ``DIR/tokens`` (once)."""
  task, state = load_codec(config, workdir, mesh)
  if int(state.step) < config.tokenizer.train.num_steps:
    raise ValueError(f"the codec in {workdir} has trained {int(state.step)} of "
                     f"{config.tokenizer.train.num_steps} steps; finish its training first")
  meta = dict(SPEECH_META, depth=task.tok.depth, codebook_size=task.tok.codebook_size,
              downsample=task.tok.downsample, tokenizer_step=int(state.step),
              audio=config.audio.to_dict(),
              data={k: v for k, v in config.data.to_dict().items()
                    if k not in ("data_dir", "download")})  # where, not what
  splits = (config.data.train_split, config.data.eval_split)
  if os.path.exists(meta_path(workdir)):
    with open(meta_path(workdir)) as f:
      saved = json.load(f)
    if json.loads(json.dumps(meta)) != saved:
      raise ValueError(f"{meta_path(workdir)} describes tokens of another codec or corpus; "
                       f"remove {os.path.dirname(meta_path(workdir))} to encode again")
    if all(os.path.exists(cache_path(workdir, s)) for s in splits):
      logging.info("speech tokens already cached in %s", os.path.dirname(meta_path(workdir)))
      return
  params = state.params["autoencoder"]
  books = state.model_state["codebook"].codebooks
  for split in splits:
    utterances, mels = split_mels(config, split)
    codes = codec_lib.encode_utterances(task.tok, params, books, mels, ENCODE_BATCH)
    if jax.process_index() == 0:
      write_speech_tokens(cache_path(workdir, split), utterances, codes)
    logging.info("encoded %d %s utterances", len(codes), split)
  if jax.process_index() == 0:
    files.save_npz(os.path.join(workdir, TOKENS_DIR, "codebooks.npz"),
                   codebooks=np.asarray(mesh_lib.to_host(books, mesh), np.float32))
    files.save_json(meta_path(workdir), meta)


def write_speech_tokens(path: str, utterances: Sequence[corpus.Utterance],
                        codes: Sequence[np.ndarray]) -> None:
  """``codes`` int16 (int32 for codebooks above 2**15) ``[N, L_max, D]`` (zero past each ``lengths[i]``), ``lengths``,
  ``texts``, ``speakers``, ``uids`` (unicode arrays: no pickle)."""
  length = max(c.shape[0] for c in codes)
  padded = np.stack([np.pad(c, ((0, length - c.shape[0]), (0, 0))) for c in codes])
  small = int(padded.max(initial=0)) < token_cache.INT16_MAX_CODES  # half the disk
  files.save_npz(path, codes=padded.astype(np.int16 if small else np.int32), lengths=np.asarray(
      [c.shape[0] for c in codes], np.int32), texts=np.asarray([u.text for u in utterances]),
                 speakers=np.asarray([u.speaker for u in utterances]),
                 uids=np.asarray([u.uid for u in utterances]))


def load_speech_tokens(workdir: str, split: str) -> dict:
  path = cache_path(workdir, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no speech tokens at {path}; run the 'encode' stage first")
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def load_codebooks(workdir: str) -> np.ndarray:
  path = os.path.join(workdir, TOKENS_DIR, "codebooks.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no codebooks at {path}; run the 'encode' stage first")
  with np.load(path, allow_pickle=False) as data:
    return data["codebooks"]


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
                       SPEECH_CLASSES, text_vocab_size=tokenizer.vocab_size,
                       max_text_length=config.text.max_length)


@dataclasses.dataclass(frozen=True, eq=False)
class SpeechTokenSource:
  """Token frames of a split as a random-access source: ``get`` returns a dict batch
  (``codes [n, L, D]``, ``valid_positions [n, L]``, ``text [n, S]``) where image sources
  return images, and constant labels."""
  name: str
  codes: np.ndarray  # int32 [N, L, D]
  valid: np.ndarray  # bool [N, L]
  text: np.ndarray  # int32 [N, S]
  num_classes: int = SPEECH_CLASSES

  @property
  def num_examples(self) -> int:
    return int(self.codes.shape[0])

  def get(self, indices: np.ndarray):
    indices = np.asarray(indices)
    return ({"codes": self.codes[indices], "valid_positions": self.valid[indices],
             "text": self.text[indices]}, np.zeros(len(indices), np.int32))


def speech_token_source(config, workdir: str, split: str, num_positions: int,
                        tokenizer) -> SpeechTokenSource:
  """A split's cached tokens fitted to the generator: utterances longer than
  ``num_positions`` frames or ``text.max_length`` text tokens are left out (logged)."""
  tokens = load_speech_tokens(workdir, split)
  keep, texts = [], []
  for i, (length, text) in enumerate(zip(tokens["lengths"], tokens["texts"])):
    ids = tokenizer.encode(str(text))
    if length <= num_positions and len(ids) <= config.text.max_length:
      keep.append(i)
      texts.append(ids)
  if len(keep) < len(tokens["lengths"]):
    logging.warning("%s: %d of %d utterances are longer than the generator's %d frames or "
                    "%d text tokens and are left out", split, len(tokens["lengths"]) - len(keep),
                    len(tokens["lengths"]), num_positions, config.text.max_length)
  if not keep:
    raise ValueError(f"no {split} utterance fits the generator ({num_positions} frames, "
                     f"{config.text.max_length} text tokens)")
  codes = np.zeros((len(keep), num_positions, tokens["codes"].shape[-1]), np.int32)
  width = min(num_positions, tokens["codes"].shape[1])
  codes[:, :width] = tokens["codes"][keep, :width]
  valid = np.arange(num_positions) < tokens["lengths"][keep][:, None]
  text = np.zeros((len(keep), config.text.max_length), np.int32)
  for row, ids in enumerate(texts):
    text[row, :len(ids)] = ids
  return SpeechTokenSource(f"tokens/{split}", codes, valid, text)


def _flat(batch: dict) -> dict:
  """A pipeline batch over a :class:`SpeechTokenSource` -> the generator's batch."""
  out = dict(batch["image"], label=batch["label"])
  if "valid" in batch:
    out["valid"] = batch["valid"]
  return out


class SpeechTokenBatches:
  """Shuffled, resumable per-process generator batches of a :class:`SpeechTokenSource`
  (the image pipeline's :class:`TrainIterator` order)."""

  def __init__(self, source: SpeechTokenSource, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self._batches = data_pipeline.TrainIterator(source, global_batch_size, seed,
                                                process_index, process_count)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return _flat(next(self._batches))

  def get_state(self) -> dict:
    return self._batches.get_state()

  def set_state(self, state: dict) -> None:
    self._batches.set_state(state)


def generator_setup(config, workdir: str):
  """``(codec, task, tokenizer)`` for the generator of a run with cached speech tokens."""
  codebooks = load_codebooks(workdir)
  codec = codec_lib.SpeechCodec(config.tokenizer, config.audio)
  return codec, make_tts_task(config, codebooks, codec), text_lib.make_text_tokenizer(
      config.text)


def run_generator(config, workdir: str, mesh) -> None:
  gcfg = config.generator.train
  mesh_lib.check_batch_size(gcfg.batch_size, mesh, gcfg.grad_accum_steps)
  mesh_lib.check_batch_size(gcfg.eval_batch_size, mesh)
  _, task, tokenizer = generator_setup(config, workdir)
  pid, count = jax.process_index(), jax.process_count()
  train = speech_token_source(config, workdir, config.data.train_split, task.num_positions,
                              tokenizer)
  evaluation = speech_token_source(config, workdir, config.data.eval_split,
                                   task.num_positions, tokenizer)
  train_iter = SpeechTokenBatches(train, gcfg.batch_size, config.seed, pid, count)
  eval_pass = lambda: (_flat(b) for b in data_pipeline.sequential_batches(
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


# ----------------------------------------------------------------------------------------
# Zero-shot synthesis
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
  """One utterance to synthesise.

  Attributes:
    name: output name (the WAV's stem).
    prompt_codes: int ``[L_p, D]`` tokens of the prompt speech, given to the sampler.
    text: the whole transcript the model is conditioned on (prompt's, then the target's).
    target_frames: token frames to generate after the prompt.
  """
  name: str
  prompt_codes: np.ndarray
  text: str
  target_frames: int


def speaking_rate_frames(prompt_frames: int, prompt_text: str, text: str, tokenizer) -> int:
  """Token frames of ``text`` at the prompt's speaking rate (frames per text token)."""
  rate = prompt_frames / len(tokenizer.encode(prompt_text))
  return max(1, int(round(rate * len(tokenizer.encode(text)))))


def make_request(name: str, prompt_codes: np.ndarray, prompt_text: str, text: str,
                 tokenizer, num_positions: int, max_text_length: int, codec,
                 audio_cfg, seconds: float = 0.0) -> Request:
  """A :class:`Request` checked against the model's limits: the prompt plus the generated
  frames must fit ``num_positions``, and the joined text ``max_text_length`` tokens. The
  length is ``seconds`` of speech when given, else the prompt's speaking rate applied to
  ``text``."""
  if not text_lib.normalize_text(text):
    raise ValueError(f"{name}: the text to synthesise is empty")
  if not text_lib.normalize_text(prompt_text):
    raise ValueError(f"{name}: the prompt's transcript is empty (it sets the speaking rate "
                     f"and conditions the model)")
  prompt_frames = prompt_codes.shape[0]
  if prompt_frames >= num_positions:
    raise ValueError(f"{name}: the prompt is {prompt_frames} token frames, the model's "
                     f"maximum length is {num_positions} (prompt and generated speech "
                     f"together); use a shorter prompt")
  if seconds > 0:
    target = codec.latent_frames(frontend.num_frames(int(seconds * audio_cfg.sample_rate),
                                                     audio_cfg))
  else:
    target = speaking_rate_frames(prompt_frames, prompt_text, text, tokenizer)
  if prompt_frames + target > num_positions:
    raise ValueError(
        f"{name}: the prompt ({prompt_frames} frames) and the speech to generate ({target} "
        f"frames) exceed the model's maximum length of {num_positions} frames; use a "
        f"shorter text or prompt")
  joined = text_lib.normalize_text(prompt_text) + " " + text_lib.normalize_text(text)
  length = len(tokenizer.encode(joined))  # raises for characters outside the tokenizer
  if length > max_text_length:
    raise ValueError(f"{name}: the prompt's and target's texts are {length} tokens, the "
                     f"model takes {max_text_length} (text.max_length)")
  return Request(name, prompt_codes, joined, target)


def prompt_codes_from_wave(wave: np.ndarray, sample_rate: int, codec, codec_state,
                           audio_cfg) -> np.ndarray:
  """A prompt clip -> its token frames ``[L_p, D]``: resampled, loudness-normalised (a
  silent clip raises), log-mels, codec; only whole token frames are kept (a last frame
  that is partly past the clip's end would put silence between prompt and speech)."""
  wave = frontend.resample(wave, sample_rate, audio_cfg.sample_rate)
  wave = frontend.normalize_loudness(wave, audio_cfg.target_loudness_db)
  mels = codec_lib.utterance_mels([wave], audio_cfg)
  codes = codec_lib.encode_utterances(codec, codec_state.params["autoencoder"],
                                      codec_state.model_state["codebook"].codebooks, mels, 1)[0]
  return codes[:max(1, mels[0].shape[0] // codec.downsample)]


def read_prompt(path: str, codec, codec_state, audio_cfg) -> np.ndarray:
  wave, rate = frontend.read_wav(path)
  try:
    return prompt_codes_from_wave(wave, rate, codec, codec_state, audio_cfg)
  except ValueError as e:
    raise ValueError(f"prompt {path!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Synthesis:
  """One synthesised utterance: ``wave`` float32 ``[(L_p + L_t) * f * hop]`` of prompt and
  generated speech vocoded together, the generated part starting at sample ``start``, and
  their log-mels ``[(L_p + L_t) * f, n_mels]`` as the codec decoded them."""
  wave: np.ndarray
  start: int
  log_mels: np.ndarray

  @property
  def generated(self) -> np.ndarray:
    """The generated speech alone: ``[L_t * f * hop]``."""
    return self.wave[self.start:]


class Synthesizer:
  """Batched zero-shot synthesis with a trained codec and generator.

  ``synthesizer(requests) -> [Synthesis]``. Requests run ``batch_size`` (rounded up to a
  multiple of the mesh's batch shards) at a time through one compiled sampler (the batch is
  padded), with the ``config.sampler`` settings; batch
  ``k`` of a call draws from ``fold_in(key(sampler.seed), k)``. Log-mels are vocoded padded
  with silence to a multiple of ``codec.BUCKET_FRAMES`` frames (one vocoder program per
  bucket), and the wave is cut back.
  """

  def __init__(self, config, codec, codec_state, task: GeneratorTask, state, tokenizer, mesh,
               batch_size: int, vocoder: Optional[frontend.Vocoder] = None):
    self.config, self.codec, self.task, self.tokenizer = config, codec, task, tokenizer
    if batch_size < 1:
      raise ValueError(f"synthesis batch size must be >= 1, got {batch_size}")
    shards = mesh_lib.batch_shards(mesh)  # the batch is split over the mesh's batch axes
    self.batch_size = -(-batch_size // shards) * shards
    self.vocoder = vocoder or frontend.GriffinLimVocoder(config.audio, config.sampler.seed)
    if self.vocoder.sample_rate != config.audio.sample_rate:
      raise ValueError(f"the vocoder's sample rate {self.vocoder.sample_rate} Hz is not the "
                       f"audio config's {config.audio.sample_rate} Hz")
    self._args = (state.eval_params(), state.model_state, codec_state.params["autoencoder"],
                  codec_state.model_state["codebook"].codebooks)
    scfg = config.sampler

    def draw(gen_params, gen_state, ae_params, books, codes, known, valid, text, rng):
      out = task.infill(gen_params, gen_state, books, codes, known, valid,
                        jnp.zeros(codes.shape[:1], jnp.int32), rng, scfg, text=text)
      return out.codes, codec.decode(ae_params, books, out.codes)

    self._mesh = mesh
    self._silence = codec_lib.silence_codes(codec, *self._args[2:])
    # Compiled here for the one batch shape, so calls time synthesis alone.
    self._draw = jax.jit(draw, out_shardings=mesh_lib.replicated(mesh)).lower(
        *self._args, *self._batch([]), jax.random.key(0)).compile()

  def _batch(self, requests: Sequence[Request]):
    size, length, depth = self.batch_size, self.task.num_positions, self.task.depth
    codes = np.broadcast_to(self._silence, (size, length, depth)).copy()  # padding: silence
    known = np.zeros((size, length, depth), bool)
    valid = np.zeros((size, length), bool)
    text = np.zeros((size, self.config.text.max_length), np.int32)
    for row in range(size if requests else 0):
      r = requests[min(row, len(requests) - 1)]  # padding rows repeat the last request
      prompt = r.prompt_codes.shape[0]
      codes[row, :prompt], known[row, :prompt] = r.prompt_codes, True
      valid[row, :prompt + r.target_frames] = True
      ids = self.tokenizer.encode(r.text)
      text[row, :len(ids)] = ids
    put = lambda x: mesh_lib.replicated_host_batch(x, self._mesh)
    return put(codes), put(known), put(valid), put(text)

  def vocode(self, log_mels: np.ndarray) -> np.ndarray:
    """``[F, n_mels]`` -> float32 ``[F * hop]``."""
    frames = log_mels.shape[0]
    bucket = -(-(frames + 1) // codec_lib.BUCKET_FRAMES) * codec_lib.BUCKET_FRAMES
    padded = codec_lib.pad_frames(log_mels, bucket, self.config.audio)
    return np.asarray(self.vocoder(padded[None]))[0, :frames * self.config.audio.hop_length]

  def __call__(self, requests: Sequence[Request]) -> List[Synthesis]:
    results = []
    f, hop = self.codec.downsample, self.config.audio.hop_length
    for index, first in enumerate(range(0, len(requests), self.batch_size)):
      chunk = requests[first:first + self.batch_size]
      rng = jax.random.fold_in(jax.random.key(self.config.sampler.seed), index)
      _, mels = self._draw(*self._args, *self._batch(chunk), rng)
      for r, mel in zip(chunk, np.asarray(mels)):
        frames = (r.prompt_codes.shape[0] + r.target_frames) * f
        results.append(Synthesis(self.vocode(mel[:frames]), r.prompt_codes.shape[0] * f * hop,
                                 mel[:frames]))
    return results


def read_synth_manifest(path: str) -> List[tuple]:
  """Rows ``(prompt_wav, prompt_text, text, name, line number)`` of a batch-synthesis TSV:
  columns ``prompt_wav<TAB>prompt_text<TAB>text[<TAB>name]`` (name: default ``line<k>``);
  blank and ``#`` lines are skipped, relative WAV paths are relative to the manifest."""
  rows, root = [], os.path.dirname(os.path.abspath(path))
  for number, line in corpus.tsv_lines(path, "synthesis manifest"):
    fields = line.split("\t")
    if len(fields) not in (3, 4):
      raise ValueError(f"{path}:{number}: expected {len(MANIFEST_COLUMNS)} or "
                       f"{len(MANIFEST_COLUMNS) + 1} tab-separated columns "
                       f"({', '.join(MANIFEST_COLUMNS)}[, name]), got {len(fields)}")
    name = fields[3] if len(fields) == 4 else f"line{number}"
    rows.append((os.path.join(root, fields[0]), fields[1], fields[2], name, number))
  if not rows:
    raise ValueError(f"the synthesis manifest {path!r} lists no utterances")
  return rows


def synth_requests(config, workdir: str, codec, codec_state, tokenizer,
                   num_positions: int) -> List[tuple]:
  """``(request, output path)`` for every row of ``synth.manifest`` (WAVs named by the
  rows, in ``synth.output`` or ``DIR/synth/<manifest name>/``), or for the single
  ``synth.text`` (``synth.output`` or ``DIR/synth/<hash of the settings>.wav``)."""
  scfg, audio = config.synth, config.audio
  limits = dict(tokenizer=tokenizer, num_positions=num_positions,
                max_text_length=config.text.max_length, codec=codec, audio_cfg=audio,
                seconds=scfg.seconds)
  if scfg.manifest:
    stem = os.path.splitext(os.path.basename(scfg.manifest))[0]
    out_dir = scfg.output or os.path.join(workdir, SYNTH_DIR, stem)
    out = []
    for wav, prompt_text, text, name, number in read_synth_manifest(scfg.manifest):
      try:
        codes = read_prompt(wav, codec, codec_state, audio)
        request = make_request(name, codes, prompt_text, text, **limits)
      except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{scfg.manifest}:{number}: {e}") from e
      out.append((request, os.path.join(out_dir, name + ".wav")))
    return out
  missing = [f"synth.{k}" for k in ("text", "prompt_wav", "prompt_text") if not scfg[k]]
  if missing:
    raise ValueError(f"--mode=synthesize needs {', '.join(missing)} (or synth.manifest)")
  codes = read_prompt(scfg.prompt_wav, codec, codec_state, audio)
  request = make_request("synth", codes, scfg.prompt_text, scfg.text, **limits)
  name = files.settings_hash({"synth": scfg.to_dict(), "sampler": config.sampler.to_dict()})
  return [(request, scfg.output or os.path.join(workdir, SYNTH_DIR, name + ".wav"))]


def run_synthesize(config, workdir: str, mesh, vocoder: Optional[frontend.Vocoder] = None
                   ) -> List[str]:
  """Synthesises ``synth.text`` in the voice of ``synth.prompt_wav`` (or every row of
  ``synth.manifest``) and writes 16-bit WAVs at ``audio.sample_rate`` of exactly the
  generated frames' length (``target_frames * f * hop_length`` samples). An existing
  output file is kept and its request skipped. Returns the output paths."""
  codec, codec_state, task, state, tokenizer = load_generator(config, workdir, mesh)
  jobs = synth_requests(config, workdir, codec, codec_state, tokenizer, task.num_positions)
  todo = [(r, p) for r, p in jobs if not os.path.exists(p)]
  for _, path in jobs:
    if os.path.exists(path):
      logging.info("kept the existing %s", path)
  if todo:
    synthesizer = Synthesizer(config, codec, codec_state, task, state, tokenizer, mesh,
                              min(config.synth.batch_size, len(todo)), vocoder)
    for (_, path), result in zip(todo, synthesizer([r for r, _ in todo])):
      if jax.process_index() == 0:
        frontend.write_wav(path, result.generated, config.audio.sample_rate)
        logging.info("wrote %s (%.2f s)", path,
                     len(result.generated) / config.audio.sample_rate)
  return [p for _, p in jobs]
