"""The Python API on a trained workdir: it loads from the workdir alone and draws what the
sample stage draws; encode/decode, reveal frames and inpainting keep their invariants; bad
input is a clear error."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import trained_config
from resgen_jax import api, config_base, stages
from resgen_jax import data as data_lib
from resgen_jax.audio import api as speech_api
from resgen_jax.codec import losses, rvq
from resgen_jax.codec.tokenizer import TokenizerTask
from resgen_jax.train import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(trained_run, tmp_path_factory):
  """A copy of the trained workdir (the tests below delete and add files in it)."""
  path = str(tmp_path_factory.mktemp("api") / "run")
  shutil.copytree(trained_run, path)
  return path


@pytest.fixture(scope="module")
def run(workdir):
  """The run loaded with data and LPIPS out of reach: loading must need neither."""
  with pytest.MonkeyPatch.context() as patch:
    def refuse(*args, **kwargs):
      raise AssertionError("loading a trained run must not read data or LPIPS weights")
    patch.setattr(data_lib, "load_all", refuse)
    patch.setattr(data_lib, "make_iterator", refuse, raising=False)
    patch.setattr(losses, "load_lpips_params", refuse)
    return api.load(workdir)


@pytest.fixture(scope="module")
def real(run):
  images, labels = data_lib.load_all(run.config.data, run.config.data.eval_split)
  return images[:8], labels[:8]


def test_the_saved_config_reads_back_as_it_was_written(workdir):
  for name in ("digits.py", "imagenet.py", "tts_tiny.py"):
    config = config_base.load_config_file(os.path.join(REPO, "configs", name))
    back = config_base.config_from_json(json.loads(config.to_json()))
    assert back.to_dict() == config.to_dict(), name
  assert api.read_run_config(workdir).to_dict() == trained_config().to_dict()


def test_sample_reproduces_the_sample_stage(run, workdir):
  """Same settings, same labels in the stage's order: the stage's images, bit for bit."""
  config = trained_config()
  with np.load(stages.sample.samples_path(config, workdir)) as data:
    stage_images, stage_labels, stage_codes = data["arr_0"], data["labels"], data["codes"]
  out = run.sample(labels=stage_labels, batch_size=config.sampler.batch_size)
  np.testing.assert_array_equal(out.images, stage_images)
  np.testing.assert_array_equal(out.codes, stage_codes)
  np.testing.assert_array_equal(out.labels, stage_labels)
  # Every token is drawn at one of the T calls.
  assert out.reveal_step.shape == out.codes.shape
  assert out.reveal_step.min() >= 1 and out.reveal_step.max() <= config.sampler.steps


def test_sample_settings_change_the_draw(run):
  base = run.sample(count=8, seed=0)
  assert base.images.shape == (8, 16, 16, 1) and base.images.dtype == np.uint8
  np.testing.assert_array_equal(base.labels, np.arange(8))
  assert not np.array_equal(run.sample(count=8, seed=1).codes, base.codes)
  two = run.sample(count=8, seed=0, steps=2)
  assert two.reveal_step.max() == 2
  np.testing.assert_array_equal(run.sample(count=8, seed=0).codes, base.codes)


def test_encode_decode_is_the_tokenizers_reconstruction(run, real):
  images, _ = real
  codes = run.encode(images)
  assert codes.shape == (8, 4, 4, 3) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < run.tokenizer.codebook_size
  full = run.decode(codes)
  assert full.shape == images.shape and full.dtype == np.uint8
  # Depth prefixes: depth=d equals decoding the first d depths; unused codes add nothing.
  np.testing.assert_array_equal(run.decode(codes, depth=1), run.decode(codes[..., :1]))
  unused = codes.copy()
  unused[..., 1:] = rvq.UNUSED_CODE
  np.testing.assert_array_equal(run.decode(unused), run.decode(codes[..., :1]))
  # The full reconstruction is closer to the images than the depth-1 one.
  err = lambda x: np.mean((x.astype(float) - images) ** 2)
  assert err(full) < err(run.decode(codes, depth=1))


def test_reveal_frames_end_at_the_images(run):
  out = run.sample(count=8, seed=3)
  frames = run.reveal_frames(out)
  steps = run.config.sampler.steps
  assert frames.shape == (steps + 1, 8, 16, 16, 1)
  np.testing.assert_array_equal(frames[-1], out.images)
  np.testing.assert_array_equal(frames[0], run.decode(np.full_like(out.codes,
                                                                   rvq.UNUSED_CODE)))
  some = run.reveal_frames(out, at=[steps])
  np.testing.assert_array_equal(some[0], out.images)


def test_inpaint_keeps_the_visible_positions(run, real):
  images, labels = real
  mask = np.zeros((8, 16, 16), bool)
  mask[:, 8:] = True  # draw the bottom half: token rows 2 and 3 of the 4x4 grid
  out = run.inpaint(images, mask, labels, seed=0)
  codes = run.encode(images)
  np.testing.assert_array_equal(out.codes[:, :2], codes[:, :2])
  assert (out.reveal_step[:, :2] == 0).all() and (out.reveal_step[:, 2:] >= 1).all()
  assert not np.array_equal(out.codes[:, 2:], codes[:, 2:])
  # Nothing masked: the tokenizer's reconstruction, every token given.
  none = run.inpaint(images, np.zeros((8, 4, 4), bool), labels)
  np.testing.assert_array_equal(none.codes, codes)
  np.testing.assert_array_equal(none.images, run.decode(codes))


def test_bad_input_is_a_clear_error(run, real, tmp_path):
  images, labels = real
  with pytest.raises(ValueError, match=r"uint8 \[N, 16, 16, 1\].*float32"):
    run.encode(images.astype(np.float32))
  with pytest.raises(ValueError, match=r"uint8 \[N, 16, 16, 1\].*\(8, 8, 8, 1\)"):
    run.encode(images[:, :8, :8])
  with pytest.raises(ValueError, match=r"codes must be integers \[N, 4, 4, D'\]"):
    run.decode(np.zeros((2, 4, 4, 5), np.int32))
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
    run.decode(np.full((2, 4, 4, 3), 16))
  with pytest.raises(ValueError, match=r"depth must be in \[1, 3\]"):
    run.decode(np.zeros((2, 4, 4, 3), np.int32), depth=4)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
    run.sample(labels=[3, 10])
  with pytest.raises(ValueError, match="labels or count, not both"):
    run.sample(labels=[1], count=1)
  with pytest.raises(ValueError, match="unknown sampler settings.*'stepz'"):
    run.sample(count=8, stepz=3)
  with pytest.raises(ValueError, match="sampler.steps"):
    run.sample(count=8, steps=0)
  with pytest.raises(ValueError, match=r"mask must be bool \[N, 16, 16\].*\[N, 4, 4\]"):
    run.inpaint(images, np.zeros((8, 5, 5), bool), labels)
  with pytest.raises(ValueError, match="one entry per image"):
    run.inpaint(images, np.zeros((8, 4, 4), bool), labels[:4])


def test_inpainting_is_refused_for_the_autoregressive_baseline(run, real, monkeypatch):
  """The RQ-Transformer draws in raster order and cannot keep given tokens."""
  images, labels = real
  config = run.config.copy_and_resolve_references()
  config.generator.family = "rq_transformer"
  task = stages.generator.FAMILIES["rq_transformer"](
      config.generator, np.asarray(run.gen_task.codebooks), run.gen_task.num_positions,
      run.gen_task.depth, run.num_classes)
  monkeypatch.setattr(run, "config", config)
  monkeypatch.setattr(run, "gen_task", task)
  with pytest.raises(ValueError, match="'rq_transformer' cannot inpaint"):
    run.inpaint(images, np.ones((8, 4, 4), bool), labels)


def test_workdirs_that_cannot_load(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a run's workdir.*config.json"):
    api.load(str(tmp_path))
  # Only the tokenizer trained: it encodes and decodes; sampling names the missing stage.
  partial = tmp_path / "tokenizer_only"
  shutil.copytree(os.path.join(workdir, "tokenizer"), partial / "tokenizer")
  shutil.copytree(os.path.join(workdir, "tokens"), partial / "tokens")
  shutil.copy(os.path.join(workdir, stages.run_config.CONFIG_FILE), partial)
  tok_only = api.load(str(partial))
  assert tok_only.gen_task is None
  with pytest.raises(FileNotFoundError, match="no trained generator"):
    tok_only.sample(count=8)
  # A speech config is not an image run.
  speech = tmp_path / "speech"
  speech.mkdir()
  config = config_base.load_config_file(os.path.join(REPO, "configs", "tts_tiny.py"))
  with pytest.raises(ValueError, match="is a speech run"):
    api.ImageRun(str(speech), config)
  with pytest.raises(ValueError, match="is an image run"):
    speech_api.SpeechRun(workdir)


def test_image_spec_is_written_and_falls_back_to_the_data(workdir, caplog):
  config = trained_config()
  spec = stages.tokenizer.read_image_spec(config, workdir)
  assert spec == {"image_size": 16, "image_channels": 1}
  os.remove(os.path.join(workdir, "tokenizer", stages.tokenizer.IMAGE_SPEC_FILE))
  try:
    assert stages.tokenizer.read_image_spec(config, workdir) == spec  # from the data, with a warning
    assert stages.tokenizer.IMAGE_SPEC_FILE in caplog.text
  finally:
    stages.tokenizer.write_image_spec(workdir, spec["image_size"], spec["image_channels"])
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  task, _ = stages.tokenizer.load(config, workdir, mesh)
  assert isinstance(task, TokenizerTask)
