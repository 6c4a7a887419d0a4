"""Zero-shot synthesis (the ``synthesize`` stage, ``--mode=synthesize``): a prompt's tokens
are given to the sampler as known tokens, the text is ``prompt_text + " " + text``, and the
length comes from the prompt's speaking rate (frames per text token) or ``synth.seconds``.
Prompt and generated frames are decoded together and vocoded (Griffin-Lim by default,
:class:`frontend.Vocoder`), and the generated part is kept: :func:`run_synthesize` writes
WAV files, :class:`Synthesizer` serves the API and the evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import corpus, frontend, tts
from resgen_jax.audio import text as text_lib
from resgen_jax.generator.task import GeneratorTask
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.utils import files

SYNTH_DIR = "synth"
MANIFEST_COLUMNS = ("prompt_wav", "prompt_text", "text")  # synth.manifest (+ optional name)



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
  codec, codec_state, task, state, tokenizer = tts.load_generator(config, workdir, mesh)
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
