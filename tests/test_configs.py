"""Every config file: its default and its ``runlocal`` shrink load and pass the start-up
checks, the shrink keeps what makes the config what it is (stages, modality, family, the
architecture's switches) and changes sizes, and an unknown variant is refused naming the
known ones. The shrinks run end to end in test_stages.py (digits), test_tts.py (tts_tiny),
test_imagenet_local.py (imagenet) and here (librispeech, the only one not run elsewhere)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import CHILD_JAX_ENV, REPO, flatten, set_fields
from resgen_jax import config_base, config_checks, stages
from resgen_jax.audio import corpus

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# What a shrink must not change: the run it stands for (its stages, modality, family and
# the switches of its architecture and sampler; audio fields only in speech configs).
KEPT = ("stages", "modality", "generator.family", "generator.model.text_mode", "generator.model.dtype",
        "generator.model.remat", "tokenizer.model.channel_multipliers",
        "tokenizer.model.mid_attention", "tokenizer.quantizer.shared_codebook",
        "audio.sample_rate", "audio.hop_length", "audio.n_mels", "sampler.cfg_scale",
        "sampler.confidence_depths", "evaluation.extractor")
# Configs whose start-up checks need files the user gives (weights, fake data).
NEEDS_FILES = ("imagenet.py",)


def test_every_config_file_is_covered():
  names = [os.path.basename(p) for p in CONFIGS]
  assert names == ["digits.py", "imagenet.py", "librispeech.py", "tts_tiny.py"]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_the_runlocal_shrink_keeps_the_run_and_shrinks_its_sizes(path):
  full = config_base.load_config_file(path)
  local = config_base.load_config_file(f"{path}:{config_base.RUNLOCAL}")
  a, b = flatten(full.to_dict()), flatten(local.to_dict())
  assert a.keys() == b.keys()
  assert {k: a.get(k) for k in KEPT} == {k: b.get(k) for k in KEPT}
  is_speech = lambda c: c.data.name in corpus.SPEECH_SOURCES
  assert is_speech(full) == is_speech(local)
  # Smaller everywhere it is a size: models, steps, batches, samples.
  for field in ("generator.model.width", "generator.model.num_layers",
                "tokenizer.model.channels", "tokenizer.train.num_steps",
                "generator.train.num_steps", "generator.train.batch_size"):
    assert b[field] < a[field], (field, a[field], b[field])
  assert b["tokenizer.quantizer.codebook_size"] <= a["tokenizer.quantizer.codebook_size"]
  if os.path.basename(path) not in NEEDS_FILES:
    config_checks.check_config(full, full.stages)
    config_checks.check_config(local, local.stages)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_an_unknown_variant_is_refused_naming_the_known_ones(path):
  name = os.path.splitext(os.path.basename(path))[0]
  with pytest.raises(ValueError, match=rf"configs/{name}.py knows the variants \('', "
                                       rf"'runlocal'\), got 'tiny'"):
    config_base.load_config_file(f"{path}:tiny")


def test_librispeech_runlocal_runs_every_stage_of_the_paper_speech_config(tmp_path):
  """The paper's speech front end (22.05 kHz, hop 256), 8x codec downsampling, depth 32,
  bfloat16 with remat and the text cross-attention, on a few eSpeak utterances."""
  config = config_base.load_config_file(
      os.path.join(REPO, "configs", "librispeech.py") + ":" + config_base.RUNLOCAL)
  workdir = str(tmp_path)
  stages.run(config, workdir)
  with open(os.path.join(workdir, "tokenizer", "results.json")) as f:
    report = json.load(f)
  assert len(report["mel_l1_by_depth"]) == 32
  with open(os.path.join(workdir, "tokens", "meta.json")) as f:
    meta = json.load(f)
  assert (meta["depth"], meta["downsample"], meta["audio"]["sample_rate"]) == (32, 8, 22050)
  results = glob.glob(os.path.join(workdir, "tts_eval", "*", "results.json"))
  assert len(results) == 1
  with open(results[0]) as f:
    tasks = json.load(f)
  assert tasks["continuation"]["num_utterances"] > 0
  assert tasks["cross_sentence"]["num_utterances"] > 0


def test_an_image_config_holds_no_speech_field_and_loads_no_speech_code():
  """In a fresh interpreter: the digits config has no speech section, and loading it and
  the stages and comparing it with a saved config (a resume) import nothing of
  resgen_jax.audio (no eSpeak, no scipy.signal)."""
  code = ("import sys, json; from resgen_jax import config_base, stages; "
          "c = config_base.load_config_file('configs/digits.py'); "
          "stages.run_config.config_differences(json.loads(c.to_json()), c.to_dict()); "
          "print(json.dumps([c.modality, sorted(c), 'min_seconds' in c.data, "
          "[m for m in sys.modules if m.startswith('resgen_jax.audio')], "
          "'scipy.signal' in sys.modules]))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, env=dict(os.environ, **CHILD_JAX_ENV))
  modality, sections, has_speech_data, audio_modules, scipy_signal = json.loads(
      out.stdout.strip().splitlines()[-1])
  assert modality == "image" and not {"audio", "text", "synth"} & set(sections)
  assert not has_speech_data and audio_modules == [] and not scipy_signal
  assert tuple(config_base.speech_fields()) == config_base.SPEECH_FIELDS
  speech = config_base.load_config_file(os.path.join(REPO, "configs", "tts_tiny.py"))
  assert speech.modality == "speech"
  assert set(config_base.speech_fields()) <= set(flatten(speech.to_dict())) | {
      "data.espeak", "audio", "text", "synth"}


def old_layout(config) -> dict:
  """``config.json`` as the code before the modality split wrote it: no ``modality`` field,
  and every speech field in image runs too."""
  saved = json.loads(config.to_json())
  del saved["modality"]
  if config.modality == "image":
    speech = json.loads(config_base.base_config("speech").to_json())
    for section in ("audio", "text", "synth"):
      saved[section] = speech[section]
    for name in config_base.speech_fields():
      parent, _, leaf = name.rpartition(".")
      if parent in ("data", "tokenizer", "evaluation"):
        saved[parent][leaf] = speech[parent][leaf]
  return saved


@pytest.mark.parametrize("name", ["digits.py", "tts_tiny.py"])
def test_a_config_json_from_before_the_split_resumes_and_reads_back(name):
  config = config_base.load_config_file(os.path.join(REPO, "configs", name))
  saved = old_layout(config)
  assert stages.run_config.config_differences(saved, config.to_dict()) == []
  assert config_base.config_from_json(saved).to_dict() == config.to_dict()
  # A changed model field is still refused, a modality switch too.
  changed = config.copy_and_resolve_references()
  changed.generator.model.width += 1
  assert stages.run_config.config_differences(saved, changed.to_dict()) == [
      "generator.model.width"]


def test_a_run_of_the_other_modality_is_refused_naming_modality():
  image = config_base.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  speech = config_base.load_config_file(os.path.join(REPO, "configs", "tts_tiny.py"))
  assert "modality" in stages.run_config.config_differences(
      json.loads(image.to_json()), speech.to_dict())


@pytest.mark.parametrize("field,value,message", [
    ("modality", "video", r"modality must be one of \('image', 'speech'\), got 'video'"),
    ("data.name", "espeak", r"data.name='espeak' is not an image source"),
])
def test_a_bad_modality_or_a_source_of_the_other_one_is_refused(field, value, message):
  config = config_base.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  set_fields(config, {field: value})
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(config, config.stages)
