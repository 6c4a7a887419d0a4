"""The speech pipeline end to end on a tiny eSpeak corpus: codec and generator training
steps, token caching, the synthesis CLI, batch synthesis, the zero-shot evaluation export,
and the errors bad prompts and texts get."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CHILD_JAX_ENV
from resgen_jax import stages
from resgen_jax.audio import codec as codec_lib
from resgen_jax.audio import espeak, frontend, speech_tokens, synthesis, tts
from resgen_jax.audio import evaluation as tts_eval
from resgen_jax.train import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough for a test: a few utterances, two steps of each stage, tiny models.
CONFIG = os.path.join(ROOT, "configs", "tts_tiny.py") + ":runlocal"


def tiny_config():
  from resgen_jax import config_base  # pylint: disable=g-import-not-at-top
  return config_base.load_config_file(CONFIG)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir after one training run of the codec and the generator (two steps each)."""
  workdir = str(tmp_path_factory.mktemp("tts"))
  config = tiny_config()
  stages.run(config, workdir, ("tokenizer", "encode", "generator"))
  prompt = os.path.join(workdir, "prompt.wav")
  wave, rate = espeak.synthesize("one two three four", "en+f5", 170, 50)
  frontend.write_wav(prompt, wave, rate)
  return config, workdir, prompt


def test_training_steps_and_token_cache(run):
  config, workdir, _ = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = f.read()
  assert '"stage": "tokenizer"' in rows and '"stage": "generator"' in rows
  report = speech_tokens.load_speech_tokens(workdir, "train")
  assert report["codes"].shape[-1] == 4 and len(report["texts"]) == len(report["lengths"])
  codec = codec_lib.SpeechCodec(config.tokenizer, config.audio)
  utterances, mels = tts.split_mels(config, "train")
  assert [u.uid for u in utterances] == list(report["uids"])
  np.testing.assert_array_equal(report["lengths"], [codec.latent_frames(m.shape[0])
                                                    for m in mels])
  # The mesh-sharded chunks hold what encoding each utterance whole gives, zero past its end.
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  codec_task, codec_state = tts.load_codec(config, workdir, mesh)
  whole = codec_lib.encode_utterances(codec_task.tok, codec_state.params["autoencoder"],
                                      codec_state.model_state["codebook"].codebooks, mels, 4)
  for codes, length, expected in zip(report["codes"], report["lengths"], whole):
    np.testing.assert_array_equal(codes[:length], expected)
    assert not codes[length:].any()


def test_a_token_cache_of_the_old_layout_is_read_and_not_encoded_again(run, tmp_path):
  """A workdir whose speech tokens are one ``speech_<split>.npz`` per split (before the
  shared chunk format) resumes: the encode stage keeps it and the generator reads it."""
  config, workdir, _ = run
  old = str(tmp_path / "old")
  os.makedirs(os.path.join(old, "tokens"))
  for name in ("tokenizer", "config.json"):
    os.symlink(os.path.join(workdir, name), os.path.join(old, name))
  splits = (config.data.train_split, config.data.eval_split)
  for split in splits:
    np.savez(speech_tokens.legacy_path(old, split),
             **speech_tokens.load_speech_tokens(workdir, split))
  np.savez(speech_tokens.codebooks_path(old), codebooks=speech_tokens.load_codebooks(workdir))
  with open(speech_tokens.meta_path(workdir)) as f:
    meta = json.load(f)
  legacy = {k: v for k, v in meta.items() if k not in ("process_count", "corpus")}
  with open(speech_tokens.meta_path(old), "w") as f:
    json.dump(dict(legacy, data=meta["corpus"]), f)
  before = sorted(os.listdir(os.path.join(old, "tokens")))
  stages.run(config, old, ("encode",))
  assert sorted(os.listdir(os.path.join(old, "tokens"))) == before
  for split in splits:
    for key, value in speech_tokens.load_speech_tokens(workdir, split).items():
      np.testing.assert_array_equal(speech_tokens.load_speech_tokens(old, split)[key], value)
  with open(speech_tokens.meta_path(old), "w") as f:
    json.dump(dict(legacy, data=dict(meta["corpus"], max_seconds=99.0)), f)
  with pytest.raises(ValueError, match="another codec or corpus"):
    stages.run(config, old, ("encode",))


def test_synthesize_cli_writes_a_wav_of_the_expected_length(run, tmp_path):
  config, workdir, prompt = run
  out = str(tmp_path / "hello.wav")
  seconds = 0.6
  result = subprocess.run(
      [sys.executable, "-m", "resgen_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
       "--mode=synthesize", "--config.synth.text=six seven",
       f"--config.synth.prompt_wav={prompt}", "--config.synth.prompt_text=one two three four",
       f"--config.synth.seconds={seconds}", f"--config.synth.output={out}"],
      cwd=ROOT, env=dict(os.environ, **CHILD_JAX_ENV), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  wave, rate = frontend.read_wav(out)
  audio = config.audio
  frames = -(-frontend.num_frames(int(seconds * audio.sample_rate), audio) // 2 ** 2)
  assert rate == audio.sample_rate
  assert wave.shape == (frames * 4 * audio.hop_length,)
  assert np.all(np.isfinite(wave)) and np.max(np.abs(wave)) > 0


def test_batch_synthesis_from_a_manifest_keeps_existing_outputs(run, tmp_path):
  config, workdir, prompt = run
  manifest = tmp_path / "requests.tsv"
  manifest.write_text(f"# prompt_wav\tprompt_text\ttext\tname\n"
                      f"{prompt}\tone two three four\tfive\tfirst\n"
                      f"{prompt}\tone two three four\tsix seven eight nine\tsecond\n")
  out_dir = tmp_path / "out"
  config = config.copy_and_resolve_references()
  config.synth.manifest, config.synth.output = str(manifest), str(out_dir)
  os.makedirs(out_dir)
  (out_dir / "first.wav").write_bytes(b"kept")
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  paths = synthesis.run_synthesize(config, workdir, mesh)
  assert paths == [str(out_dir / "first.wav"), str(out_dir / "second.wav")]
  assert (out_dir / "first.wav").read_bytes() == b"kept"
  wave, _ = frontend.read_wav(str(out_dir / "second.wav"))
  codec, codec_state, task, _, tokenizer = tts.load_generator(config, workdir, mesh)
  prompt_codes = synthesis.read_prompt(prompt, codec, codec_state, config.audio)
  frames = synthesis.speaking_rate_frames(len(prompt_codes), "one two three four",
                                    "six seven eight nine", tokenizer)
  assert frames > synthesis.speaking_rate_frames(len(prompt_codes), "one two three four", "five",
                                           tokenizer)
  assert wave.shape == (frames * codec.downsample * config.audio.hop_length,)


def test_bad_prompts_and_texts_get_clear_errors(run, tmp_path):
  config, workdir, prompt = run
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  codec, codec_state, task, _, tokenizer = tts.load_generator(config, workdir, mesh)
  codes = synthesis.read_prompt(prompt, codec, codec_state, config.audio)
  limits = dict(tokenizer=tokenizer, num_positions=task.num_positions,
                max_text_length=config.text.max_length, codec=codec, audio_cfg=config.audio)
  long_prompt = np.zeros((task.num_positions, codes.shape[1]), np.int32)
  with pytest.raises(ValueError, match="maximum length"):
    synthesis.make_request("x", long_prompt, "one", "two", **limits)
  with pytest.raises(ValueError, match="exceed the model's maximum length"):
    synthesis.make_request("x", codes, "one", "two", seconds=30.0, **{
        k: v for k, v in limits.items()})
  with pytest.raises(ValueError, match="empty"):
    synthesis.make_request("x", codes, "one two", "   ", **limits)
  with pytest.raises(ValueError, match="#"):
    synthesis.make_request("x", codes, "one two", "three # four", **limits)
  silent = str(tmp_path / "silent.wav")
  frontend.write_wav(silent, np.zeros(8000), 16000)
  with pytest.raises(ValueError, match="silent"):
    synthesis.read_prompt(silent, codec, codec_state, config.audio)
  corrupt = tmp_path / "corrupt.wav"
  corrupt.write_bytes(b"RIFF....WAVEjunk")
  with pytest.raises(ValueError, match="corrupt.wav"):
    synthesis.read_prompt(str(corrupt), codec, codec_state, config.audio)
  with pytest.raises(FileNotFoundError, match="missing.wav"):
    synthesis.read_prompt(str(tmp_path / "missing.wav"), codec, codec_state, config.audio)
  config = config.copy_and_resolve_references()
  config.synth.text = "two"
  with pytest.raises(ValueError, match="synth.prompt_wav, synth.prompt_text"):
    synthesis.run_synthesize(config, workdir, mesh)


def test_zero_shot_evaluation_exports_both_tasks(run):
  config, workdir, _ = run
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  report = tts_eval.run_evaluate(config, workdir, mesh)
  out_dir = os.path.join(workdir, tts_eval.EVAL_DIR, tts_eval.eval_tag(config))
  utterances, _ = tts.split_mels(config, config.data.eval_split)
  by_uid = {u.uid: u for u in utterances}
  for task in tts_eval.TASKS:
    if task not in report:
      continue
    with open(os.path.join(out_dir, task, "meta.lst")) as f:
      rows = [line.rstrip("\n").split("|") for line in f]
    assert len(rows) == report[task]["num_utterances"] > 0
    for uid, prompt_text, prompt_wav, target_text, gt_wav in rows:
      assert target_text == by_uid[uid].text
      gt, _ = frontend.read_wav(os.path.join(out_dir, task, gt_wav))
      np.testing.assert_allclose(gt, by_uid[uid].wave, atol=1.0 / 32768 + 1e-6)
      generated, _ = frontend.read_wav(os.path.join(out_dir, task, "wavs", uid + ".wav"))
      assert generated.size > 0 and os.path.exists(os.path.join(out_dir, task, prompt_wav))
      if task == "continuation":  # prompt + continuation, as long as the real utterance
        assert prompt_text == ""
        assert abs(generated.size - gt.size) < 4 * config.audio.hop_length * 2
  assert "mcd_db" in report["continuation"] and report["continuation"]["mcd_db"] >= 0
  assert 0 < report["cross_sentence"]["duration_ratio"]
  assert 0 <= report["cross_sentence"]["word_f1"]["real"] <= 1
  assert tts_eval.run_evaluate(config, workdir, mesh) == report  # kept, not redone


def test_python_api_speaks_as_the_synthesize_stage(run, tmp_path):
  """``api.load(workdir).synthesize`` is the stage's code: the same wave as its WAV (up to
  16-bit rounding), from a path or an in-memory prompt."""
  from resgen_jax import api  # pylint: disable=g-import-not-at-top
  from resgen_jax.audio import api as speech_api  # pylint: disable=g-import-not-at-top
  config, workdir, prompt = run
  speech_run = api.load(workdir)
  assert isinstance(speech_run, speech_api.SpeechRun)
  speech = speech_run.synthesize("six seven", prompt, "one two three four", seconds=0.6)
  stage = config.copy_and_resolve_references()
  stage.synth.update(text="six seven", prompt_wav=prompt, prompt_text="one two three four",
                     seconds=0.6, output=str(tmp_path / "stage.wav"))
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  synthesis.run_synthesize(stage, workdir, mesh)
  wave, rate = frontend.read_wav(str(tmp_path / "stage.wav"))
  assert speech.sample_rate == rate and speech.wave.shape == wave.shape
  np.testing.assert_allclose(speech.wave, wave, atol=2 / 2 ** 15)
  assert speech.log_mels.shape[1] == config.audio.n_mels
  hop = config.audio.hop_length
  assert speech.log_mels.shape[0] - speech.prompt_mel_frames == len(speech.wave) // hop
  in_memory = speech_run.synthesize("six seven", frontend.read_wav(prompt),
                                    "one two three four", seconds=0.6)
  np.testing.assert_array_equal(in_memory.wave, speech.wave)
  assert not np.array_equal(
      speech_run.synthesize("six seven", prompt, "one two three four", seconds=0.6,
                            seed=1).wave, speech.wave)
  with pytest.raises(ValueError, match="empty"):
    speech_run.synthesize("  ", prompt, "one two three four")
  with pytest.raises(ValueError, match=r"\(wave, sample_rate\) tuple"):
    speech_run.synthesize("six", np.zeros(100), "one two three four")
  with pytest.raises(ValueError, match="sample rate in Hz"):
    speech_run.synthesize("six", (np.zeros((2, 100)), 16000), "one two three four")
  with pytest.raises(ValueError, match="unknown sampler settings"):
    speech_run.synthesize("six", prompt, "one two three four", stepz=2)
  with pytest.raises(ValueError, match="is a speech run"):
    api.ImageRun(workdir)


def test_tts_notebook_runs_on_the_trained_workdir(run):
  """notebooks/tts.ipynb after training: the unseen-voice prompt, synthesis, the log-mels."""
  from conftest import execute_notebook  # pylint: disable=g-import-not-at-top
  _, workdir, _ = run
  notebook = execute_notebook("tts.ipynb", dict(
      WORKDIR=workdir, TRAIN=False, TEXT="six seven", PROMPT_TEXT="one two", SECONDS=0.6))
  outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
  assert sum("audio" in out.get("data", {}).get("text/html", "") for out in outputs) == 2
  assert any("image/png" in out.get("data", {}) for out in outputs)
  assert any("0.6" in out.get("text", "") and "s of speech" in out.get("text", "")
             for out in outputs)
