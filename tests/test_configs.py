"""Every config file: its default and its ``runlocal`` shrink load and pass the start-up
checks, the shrink keeps what makes the config what it is (stages, modality, family, the
architecture's switches) and changes sizes, and an unknown variant is refused naming the
known ones. The shrinks run end to end in test_stages.py (digits), test_tts.py (tts_tiny),
test_imagenet_local.py (imagenet) and here (librispeech, the only one not run elsewhere)."""

import glob
import json
import os

import pytest

from conftest import REPO
from resgen_jax import config_base, config_checks, stages
from resgen_jax.audio import corpus

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# What a shrink must not change: the run it stands for (its stages, modality, family and
# the switches of its architecture and sampler).
KEPT = ("stages", "generator.family", "generator.model.text_mode", "generator.model.dtype",
        "generator.model.remat", "tokenizer.model.channel_multipliers",
        "tokenizer.model.mid_attention", "tokenizer.quantizer.shared_codebook",
        "audio.sample_rate", "audio.hop_length", "audio.n_mels", "sampler.cfg_scale",
        "sampler.confidence_depths", "evaluation.extractor")
# Configs whose start-up checks need files the user gives (weights, fake data).
NEEDS_FILES = ("imagenet.py",)


def flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_every_config_file_is_covered():
  names = [os.path.basename(p) for p in CONFIGS]
  assert names == ["digits.py", "imagenet.py", "librispeech.py", "tts_tiny.py"]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_the_runlocal_shrink_keeps_the_run_and_shrinks_its_sizes(path):
  full = config_base.load_config_file(path)
  local = config_base.load_config_file(f"{path}:{config_base.RUNLOCAL}")
  a, b = flatten(full.to_dict()), flatten(local.to_dict())
  assert a.keys() == b.keys()
  assert {k: a[k] for k in KEPT} == {k: b[k] for k in KEPT}
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
