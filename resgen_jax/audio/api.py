"""The speech side of the Python API: a trained text-to-speech run speaking in a prompt's voice.

    from resgen_jax import api

    run = api.load("/tmp/tts")                     # a SpeechRun
    speech = run.synthesize("six seven eight", prompt_wav="prompt.wav",
                            prompt_text="one two three four", seed=0)
    speech.wave, speech.sample_rate                # float32 [S], the generated speech alone
    speech.log_mels                                # [F, n_mels]: prompt and generated frames

The same code as ``--mode=synthesize`` (:class:`synthesis.Synthesizer`): with the run's sampler
settings the wave equals the stage's WAV. Loading needs only the workdir.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple, Union

import ml_collections
import numpy as np

from resgen_jax import runs
from resgen_jax.audio import frontend, synthesis, tts
from resgen_jax.utils import files

# A prompt: a WAV file's path or ``(wave float [T], sample rate in Hz)``.
Prompt = Union[str, Tuple[np.ndarray, int]]


@dataclasses.dataclass(frozen=True)
class Speech:
  """One synthesised utterance.

  Attributes:
    wave: float32 ``[S]``, the generated speech alone (the prompt is not repeated).
    sample_rate: Hz of ``wave``.
    log_mels: float ``[F, n_mels]``, the prompt's and the generated frames as the codec
      decoded them; the generated ones start at frame ``prompt_mel_frames``.
    prompt_mel_frames: mel frames of the prompt in ``log_mels``.
  """
  wave: np.ndarray
  sample_rate: int
  log_mels: np.ndarray
  prompt_mel_frames: int


class SpeechRun:
  """A trained speech run: its codec and generator (EMA weights) and text tokenizer.

  Args:
    workdir: the run's directory.
    config: its config (default: read from ``DIR/config.json``).
    mesh: devices to run on (default :func:`runs.default_mesh`).
    vocoder: mels -> waves (default Griffin-Lim, as the synthesize stage).
  """

  def __init__(self, workdir: str, config: Optional[ml_collections.ConfigDict] = None,
               mesh=None, vocoder: Optional[frontend.Vocoder] = None):
    self.workdir = workdir
    self.config = runs.read_run_config(workdir) if config is None else config
    if self.config.modality != "speech":
      raise ValueError(f"{workdir} is an image run (modality {self.config.modality!r}, "
                       f"data.name={self.config.data.name!r}); "
                       f"load it with api.load or api.ImageRun")
    self.mesh = runs.default_mesh(self.config) if mesh is None else mesh
    for stage in ("tokenizer", "generator"):
      runs.check_trained(workdir, stage)
    (self.codec, self.codec_state, self.task, self.state,
     self.tokenizer) = tts.load_generator(self.config, workdir, self.mesh)
    self.sample_rate = self.config.audio.sample_rate
    self.vocoder = vocoder
    self._synthesizers: Dict[str, synthesis.Synthesizer] = {}

  def prompt_codes(self, prompt: Prompt) -> np.ndarray:
    """A prompt clip (path or ``(wave, rate)``) -> its token frames ``[L_p, D]``."""
    if isinstance(prompt, str):
      return synthesis.read_prompt(prompt, self.codec, self.codec_state, self.config.audio)
    if not (isinstance(prompt, tuple) and len(prompt) == 2):
      raise ValueError("prompt_wav must be a WAV path or a (wave, sample_rate) tuple, got "
                       f"{type(prompt).__name__}")
    wave, rate = np.asarray(prompt[0], np.float32), prompt[1]
    if wave.ndim != 1 or not wave.size or not isinstance(rate, (int, np.integer)) or rate < 1:
      raise ValueError(f"prompt_wav must be (float wave [T], sample rate in Hz), got a wave "
                       f"of shape {wave.shape} at {rate!r} Hz")
    if not np.all(np.isfinite(wave)):
      raise ValueError("prompt_wav: the wave holds non-finite values")
    try:
      return synthesis.prompt_codes_from_wave(wave, int(rate), self.codec, self.codec_state,
                                        self.config.audio)
    except ValueError as e:
      raise ValueError(f"prompt_wav: {e}") from e

  def _synthesizer(self, config) -> synthesis.Synthesizer:
    key = files.settings_hash(config.sampler.to_dict())
    if key not in self._synthesizers:
      self._synthesizers[key] = synthesis.Synthesizer(
          config, self.codec, self.codec_state, self.task, self.state, self.tokenizer,
          self.mesh, 1, self.vocoder)
    return self._synthesizers[key]

  def synthesize(self, text: str, prompt_wav: Prompt, prompt_text: str, *,
                 seconds: float = 0.0, steps: Optional[int] = None,
                 cfg_scale: Optional[float] = None, temperature: Optional[float] = None,
                 top_p: Optional[float] = None, seed: int = 0, **sampler_settings) -> Speech:
    """``text`` spoken in the voice of ``prompt_wav``, whose transcript is ``prompt_text``.

    Args:
      text: what to say.
      prompt_wav: the voice: a WAV path or ``(wave, sample rate)``.
      prompt_text: the prompt's transcript (sets the speaking rate and conditions the model).
      seconds: the length of the generated speech (0: the prompt's speaking rate).
      steps, cfg_scale, temperature, top_p, **sampler_settings: ``config.sampler`` fields
        (None: the run's).
      seed: the draw (``fold_in(key(seed), 0)``, as the synthesize stage).
    Returns:
      :class:`Speech`.
    """
    config = runs.sampler_config(self.config, self.mesh, 1, None, seed, steps=steps,
                                cfg_scale=cfg_scale, temperature=temperature, top_p=top_p,
                                **sampler_settings)
    request = synthesis.make_request(
        "synthesize", self.prompt_codes(prompt_wav), prompt_text, text, self.tokenizer,
        self.task.num_positions, config.text.max_length, self.codec, config.audio, seconds)
    result, = self._synthesizer(config)([request])
    return Speech(wave=result.generated, sample_rate=self.sample_rate,
                  log_mels=result.log_mels,
                  prompt_mel_frames=request.prompt_codes.shape[0] * self.codec.downsample)
