"""The stages end to end on the embedded digits: report, token cache, reruns, bad input,
and the command line."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHILD_JAX_ENV, TRAINED_STEPS, set_fields, tiny_config, trained_config
from resgen_jax import config_base
from resgen_jax import data as data_lib
from resgen_jax import stages
from resgen_jax.codec import token_cache
from resgen_jax.codec.tokenizer import TokenizerTask, prefix_reconstructions
from resgen_jax.evaluation import classifier, frechet
from resgen_jax.evaluation import features as features_lib
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import preemption, trainer
from resgen_jax.utils import images as image_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="module")
def trained(trained_run):
  """A workdir where the tiny pipeline ran every stage (shared with the other modules)."""
  return trained_run


def test_psnr_rises_with_depth_on_the_trained_tokenizer(trained):
  with open(os.path.join(trained, "tokenizer", stages.tokenizer.RESULTS_FILE)) as f:
    report = json.load(f)
  psnr = report["psnr_by_depth"]
  assert report["step"] == TRAINED_STEPS and len(psnr) == 3
  assert all(b >= a for a, b in zip(psnr, psnr[1:])), psnr
  assert psnr[-1] > psnr[0] + 0.5, psnr
  ssim = report["ssim_by_depth"]  # 16 x 16 digits: a 6 x 6 map of 11 x 11 windows
  assert len(ssim) == 3 and all(0.0 < v <= 1.0 for v in ssim) and ssim[-1] > ssim[0], ssim
  # Codebook use over the eval split, from the cached eval codes (16 codes per book).
  codes, _ = token_cache.load_tokens(trained, "test")
  for j in range(3):
    used = np.unique(codes[..., j]).size
    assert report["usage_by_depth"][j] == used / 16
    freq = np.bincount(codes[..., j].ravel(), minlength=16) / codes[..., j].size
    entropy = -sum(p * np.log(p) for p in freq if p > 0)
    assert report["perplexity_by_depth"][j] == pytest.approx(np.exp(entropy), rel=1e-9)
  assert os.path.exists(os.path.join(trained, "tokenizer", stages.tokenizer.RECON_FILE))
  rows = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r and r["stage"] == "tokenizer"] == [
      50, 100, 150]
  assert [r["step"] for r in rows if "train/loss" in r and r["stage"] == "generator"] == [
      10, 20]
  with open(os.path.join(trained, stages.run_config.CONFIG_FILE)) as f:
    assert json.load(f)["tokenizer"]["train"]["num_steps"] == TRAINED_STEPS


def test_reconstruction_fid_per_depth_matches_a_direct_computation(trained):
  """The report's rFID (batches of 128 with a padded last one, features per batch) against
  all 297 held-out images reconstructed and featurised at once."""
  config = trained_config()
  with open(os.path.join(trained, "tokenizer", stages.tokenizer.RESULTS_FILE)) as f:
    rfid = json.load(f)["rfid_by_depth"]
  images, labels = data_lib.load_all(config.data, "test")
  task = TokenizerTask(config.tokenizer, 1)
  state = trainer.load_trained_state(
      task, config.tokenizer.train, trained,
      {"image": jnp.asarray(images[:8]), "label": jnp.asarray(labels[:8])},
      mesh_lib.make_mesh(("data",), (-1,)), config.seed)
  recons = np.asarray(prefix_reconstructions(task.tok, state.params["autoencoder"],
                                             state.model_state["codebook"].codebooks,
                                             jnp.asarray(images)))
  params = stages.extractors.classifier_params(config, trained)
  features = lambda x: classifier.predict(params, 10, x, batch_size=len(x))[1]
  real = frechet.gaussian_stats(features(images))
  expected = [frechet.frechet_distance(*frechet.gaussian_stats(
      features(image_utils.to_uint8(r))), *real) for r in recons]
  assert rfid == pytest.approx(expected, rel=1e-3)
  assert rfid[-1] < rfid[0], rfid  # finer codes, closer to the data


def test_fid_proxy_is_logged_and_ends_at_the_sample_sets_distance(trained):
  config = trained_config()
  rows = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
  proxy = {r["step"]: r["train/fid_proxy"] for r in rows if "train/fid_proxy" in r}
  assert sorted(proxy) == [10, 20] and all(v > 0 for v in proxy.values())
  samples = stages.sample.samples_path(config, trained)
  with open(os.path.splitext(samples)[0] + "_eval.json") as f:
    sampled = json.load(f)["generated"]["frechet_distance"]
  assert proxy[20] == pytest.approx(sampled, rel=1e-5)


@pytest.mark.parametrize("family", ["direct", "rq_transformer"])
def test_baselines_share_the_stages_on_the_same_tokens(trained, tmp_path, family):
  """One config field switches the generator: the same tokens, trainer, checkpoints,
  sampler stage and evaluation; the workdir of another family is refused."""
  config = trained_config()
  config.generator.family = family
  config.generator.train.update(num_steps=4, log_every=2)
  config.evaluation.proxy_every = 2
  run_dir = str(tmp_path / family)
  for name in ("tokenizer", token_cache.TOKENS_DIR, stages.extractors.EVALUATION_DIR):
    shutil.copytree(os.path.join(trained, name), os.path.join(run_dir, name))
  stages.run(config, run_dir, stages=("generator", "sample", "evaluate"))
  samples = stages.sample.samples_path(config, run_dir)
  with np.load(samples) as data:
    assert data["arr_0"].shape == (20, 16, 16, 1) and data["codes"].shape == (20, 4, 4, 3)
    assert data["codes"].min() >= 0 and data["codes"].max() < 16
  with open(os.path.splitext(samples)[0] + "_eval.json") as f:
    assert json.load(f)["generated"]["frechet_distance"] > 0
  rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/fid_proxy" in r] == [2, 4]
  with pytest.raises(ValueError, match="generator.family"):
    stages.run(trained_config(), run_dir, stages=("sample",))


def test_a_generator_of_a_depth_prefix_of_the_cached_codes(trained, tmp_path):
  """generator.token_depth=2 on the depth-3 cache: the generator models and samples the
  first two depths, its images are the tokenizer's decodes of that prefix; out of range
  is refused by name."""
  config = trained_config()
  config.generator.token_depth = 2
  config.generator.train.update(num_steps=4, log_every=2)
  config.evaluation.proxy_every = 0
  run_dir = str(tmp_path / "prefix")
  for name in ("tokenizer", token_cache.TOKENS_DIR, stages.extractors.EVALUATION_DIR):
    shutil.copytree(os.path.join(trained, name), os.path.join(run_dir, name))
  stages.run(config, run_dir, stages=("generator", "sample"))
  gen_task, _ = stages.generator.load(config, run_dir, mesh_lib.make_mesh(("data",), (-1,)))
  assert gen_task.depth == 2 and gen_task.codebooks.shape[0] == 2
  with np.load(stages.sample.samples_path(config, run_dir)) as data:
    images, codes = data["arr_0"], data["codes"]
  assert codes.shape == (20, 4, 4, 2)
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  tok_task, tok_state = stages.tokenizer.load(config, run_dir, mesh)
  books = tok_state.model_state["codebook"].codebooks
  padded = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), codes.dtype)], -1)
  decoded = image_utils.to_uint8(tok_task.tok.decode(
      tok_state.params["autoencoder"], books, jnp.asarray(padded), prefix=2))
  assert np.abs(decoded.astype(int) - images.astype(int)).max() <= 1
  config.generator.token_depth = 4
  with pytest.raises(ValueError, match=r"generator.token_depth must be in \[0, 3\]"):
    stages.generator.make_task(config, run_dir)


def test_a_token_cache_of_other_data_is_refused(tmp_path, caplog):
  """The cache records what it was encoded from; pointing the data fields at other data
  is refused by name, moving the same data is not, and an older cache passes with a
  warning."""
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1)).astype(np.uint8)
  paths = {}
  for name, pixels in (("a", images), ("copy", images), ("other", images[::-1])):
    paths[name] = str(tmp_path / f"{name}.npz")
    np.savez(paths[name], images=pixels, labels=np.arange(6) % 4)
  config = tiny_config()
  config.data.update(name="npz", path=paths["a"], eval_path=paths["a"], num_classes=4)
  workdir = str(tmp_path / "run")
  fingerprints = {s: data_lib.fingerprint(config.data, s) for s in ("train", "test")}
  token_cache.write_meta(workdir, {"grid": [4, 4], "depth": 3, "data": fingerprints},
                         np.zeros((3, 16, 4), np.float32))
  stages.encode.check_token_data(config, workdir)
  config.data.path = paths["copy"]  # the same data elsewhere
  stages.encode.check_token_data(config, workdir)
  config.data.eval_path = paths["other"]
  with pytest.raises(ValueError, match=r"encoded from other data .* \(splits \['test'\]"):
    stages.encode.check_token_data(config, workdir)
  token_cache.write_meta(workdir, {"grid": [4, 4], "depth": 3},
                         np.zeros((3, 16, 4), np.float32))
  stages.encode.check_token_data(config, workdir)
  assert "does not record which data" in caplog.text


def test_damaged_checkpoints_fall_back_to_the_previous_good_one(trained, tmp_path, caplog):
  """A truncated chunk (an error on restore) and a checkpoint full of NaN (loads without
  one) are both skipped, with a warning naming them and the step used instead."""
  config = trained_config()
  run_dir = str(tmp_path / "run")
  shutil.copytree(os.path.join(trained, "tokenizer"), os.path.join(run_dir, "tokenizer"))
  shutil.copytree(os.path.join(trained, token_cache.TOKENS_DIR),
                  os.path.join(run_dir, token_cache.TOKENS_DIR))
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  checkpoints = os.path.join(run_dir, "tokenizer", trainer.CHECKPOINT_DIR)
  assert sorted(os.listdir(checkpoints)) == ["100", str(TRAINED_STEPS)]
  _, good = stages.tokenizer.load(config, run_dir, mesh)
  # A NaN copy of the good state saved as a newer step, and the next one's chunk truncated.
  keep_all = config.tokenizer.train.copy_and_resolve_references()
  keep_all.keep_checkpoints = 3
  manager = trainer.checkpoint_manager(os.path.join(run_dir, "tokenizer"), keep_all)
  nan = good.replace(step=good.step + 10, params=jax.tree.map(
      lambda x: x * jnp.nan, good.params))
  trainer.save_state(manager, nan, {})
  manager.wait_until_finished()
  manager.close()
  chunks = [os.path.join(d, f)
            for d, _, names in os.walk(os.path.join(checkpoints, str(TRAINED_STEPS)))
            for f in names if os.path.basename(d) == "d"]
  for chunk in chunks:
    with open(chunk, "r+b") as f:
      f.truncate(os.path.getsize(chunk) // 2)
  with caplog.at_level(logging.WARNING):
    _, state = stages.tokenizer.load(config, run_dir, mesh)
  assert int(state.step) == 100
  assert f"/{TRAINED_STEPS + 10} holds non-finite values" in caplog.text
  assert f"/{TRAINED_STEPS} cannot be read" in caplog.text
  assert f"using checkpoint step 100 instead of the newest, step {TRAINED_STEPS + 10}" \
      in caplog.text
  assert sorted(os.listdir(checkpoints)) == ["100", str(TRAINED_STEPS),
                                             str(TRAINED_STEPS + 10)]  # nothing renamed


def test_unknown_family_is_a_clear_error(trained):
  config = trained_config()
  config.generator.family = "maskgit"
  with pytest.raises(ValueError, match="generator.family must be one of"):
    stages.generator.make_task(config, trained)


def test_cached_codes_are_the_tokenizers_codes(trained):
  config = trained_config()
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  images, labels = data_lib.load_all(config.data, "test")
  task = TokenizerTask(config.tokenizer, 1)
  state = trainer.load_trained_state(
      task, config.tokenizer.train, trained,
      {"image": jnp.asarray(images[:8]), "label": jnp.asarray(labels[:8])}, mesh, config.seed)
  codes, cached_labels = token_cache.load_tokens(trained, "test")
  expected = task.tok.encode(state.params["autoencoder"],
                             state.model_state["codebook"].codebooks, jnp.asarray(images))
  np.testing.assert_array_equal(codes, expected)
  np.testing.assert_array_equal(cached_labels, labels)
  train_codes, _ = token_cache.load_tokens(trained, "train")
  assert train_codes.shape == (1500, 4, 4, 3)
  assert train_codes.min() >= 0 and train_codes.max() < 16
  with open(token_cache.meta_path(trained)) as f:
    meta = json.load(f)
  data = meta.pop("data")
  assert meta == {"grid": [4, 4], "depth": 3, "codebook_size": 16,
                  "tokenizer_step": TRAINED_STEPS, "image_size": 16, "process_count": 1}
  assert data == {s: data_lib.fingerprint(config.data, s) for s in ("train", "test")}
  assert data["train"]["examples"] == 1500 and data["test"]["examples"] == 297


def test_a_preempted_encoding_resumes_after_its_last_chunk(trained, tmp_path, monkeypatch):
  """SIGTERM while the train split's batch 7 is read (chunks of 5 batches): the run exits
  143 having written chunk 0 only and no meta.json; the rerun reads the data from batch 5
  on (not from zero), and every token file equals an uninterrupted encoding's."""
  config = trained_config()
  config.tokenizer.encode_chunk_batches = 5
  runs = {}
  for name in ("cut", "whole"):
    runs[name] = str(tmp_path / name)
    shutil.copytree(os.path.join(trained, "tokenizer"), os.path.join(runs[name], "tokenizer"))
  reads, signal_at = [], []
  original = data_lib.sequential_batches

  def batches(source, *args, **kwargs):
    start = kwargs.get("start_batch", args[4] if len(args) > 4 else 0)
    reads.append((source.num_examples, start))
    for n, batch in enumerate(original(source, *args, **kwargs), start=start):
      if (source.num_examples, n) in signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(data_lib, "sequential_batches", batches)
  signal_at.append((1500, 7))
  with pytest.raises(SystemExit) as exit_info:
    stages.run(config, runs["cut"], stages=("encode",))
  assert exit_info.value.code == preemption.EXIT_CODE
  tokens = lambda run: sorted(os.listdir(os.path.join(run, token_cache.TOKENS_DIR)))
  assert tokens(runs["cut"]) == ["encoding.json", "train.00000-of-00001.00000.npz"]
  signal_at.clear()
  reads.clear()
  stages.run(config, runs["cut"], stages=("encode",))
  assert reads[-2:] == [(1500, 5), (297, 0)]  # train resumed at batch 5, test from its start
  stages.run(config, runs["whole"], stages=("encode",))
  names = tokens(runs["whole"])
  assert tokens(runs["cut"]) == names  # meta.json written, encoding.json gone
  assert names == ["codebooks.npz", "meta.json", "test.00000-of-00001.00000.npz"] + [
      f"train.00000-of-00001.0000{c}.npz" for c in range(3)]  # 12 train batches, 3 test
  names.remove("meta.json")
  for name in names:
    with np.load(os.path.join(runs["cut"], token_cache.TOKENS_DIR, name)) as a, \
        np.load(os.path.join(runs["whole"], token_cache.TOKENS_DIR, name)) as b:
      assert sorted(a.files) == sorted(b.files)
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
  for split in ("train", "test"):  # and the same codes as the fixture's one-chunk cache
    for x, y in zip(token_cache.load_tokens(runs["cut"], split),
                    token_cache.load_tokens(trained, split)):
      np.testing.assert_array_equal(x, y)


def test_rerun_of_a_finished_run_rewrites_nothing(trained):
  samples = stages.sample.samples_path(trained_config(), trained)
  outputs = [os.path.join(trained, "tokenizer", stages.tokenizer.RESULTS_FILE),
             os.path.join(trained, "tokenizer", stages.tokenizer.RECON_FILE),
             token_cache.chunk_path(trained, "train", 0, 1, 0), token_cache.meta_path(trained),
             samples, os.path.splitext(samples)[0] + "_eval.json"]
  before = {p: os.stat(p).st_mtime_ns for p in outputs}
  checkpoints = sorted(os.listdir(os.path.join(trained, "tokenizer", trainer.CHECKPOINT_DIR)))
  stages.run(trained_config(), trained)
  assert {p: os.stat(p).st_mtime_ns for p in outputs} == before
  assert sorted(os.listdir(os.path.join(trained, "tokenizer",
                                        trainer.CHECKPOINT_DIR))) == checkpoints


def test_samples_are_written_in_the_evaluator_layout(trained):
  config = trained_config()
  path = stages.sample.samples_path(config, trained)
  assert os.path.basename(path).startswith("T4_cfg1_temp1_topp1_conf1_seed0_")
  with np.load(path) as data:
    images, labels, codes = data["arr_0"], data["labels"], data["codes"]
  assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 1)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
  assert codes.shape == (20, 4, 4, 3) and codes.min() >= 0 and codes.max() < 16
  grids = sorted(os.listdir(os.path.splitext(path)[0]))
  assert grids == [f"class_{c:04d}.png" for c in range(10)]
  with open(os.path.splitext(path)[0] + "_eval.json") as f:
    report = json.load(f)
  assert report["num_samples"] == 20
  for key in ("generated", "real_heldout"):
    assert 0.0 <= report[key]["class_agreement"] <= 1.0
    assert report[key]["frechet_distance"] >= 0.0


def test_a_sample_set_names_and_records_the_models_it_came_from(trained, tmp_path):
  """The default set's name ends in the generator step and the set (and its report)
  record both steps; a set named by sampler.tag is refused, never scored, once the
  generator has trained past it (here: a newer checkpoint injected by hand)."""
  config = trained_config()
  path = stages.sample.samples_path(config, trained)
  assert path.endswith(f"_g{config.generator.train.num_steps}.npz")
  with np.load(path) as data:
    assert int(data["generator_step"]) == 20
    assert int(data["tokenizer_step"]) == TRAINED_STEPS
  with open(os.path.splitext(path)[0] + "_eval.json") as f:
    assert json.load(f)["generator_step"] == 20
  run_dir = str(tmp_path / "run")
  shutil.copytree(trained, run_dir, symlinks=True)
  config.sampler.tag = "fixed"
  stages.run(config, run_dir, stages=("sample",))
  checkpoints = os.path.join(run_dir, "generator", trainer.CHECKPOINT_DIR)
  shutil.copytree(os.path.join(checkpoints, "20"), os.path.join(checkpoints, "30"))
  for stage in ("sample", "evaluate"):
    with pytest.raises(ValueError, match=r"fixed.npz was drawn from generator step 20 "
                                         r"\(now 30\)"):
      stages.run(config, run_dir, stages=(stage,))
  assert os.path.exists(os.path.join(run_dir, "samples", "fixed.npz"))  # kept as it was


def test_another_sampler_setting_makes_another_sample_set(trained, monkeypatch):
  config = trained_config()
  config.sampler.cfg_scale = 2.0
  config.sampler.cfg_ramp = "linear"
  path = stages.sample.samples_path(config, trained)
  # SIGTERM while the second of the two batches is drawn: the stage stops before sampling
  # it, exits 143 and leaves neither a sample set nor its scratch arrays.
  original = stages.sampling.label_batches

  def batches(labels, batch_size):
    for index, chunk in original(labels, batch_size):
      if index == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield index, chunk

  monkeypatch.setattr(stages.sampling, "label_batches", batches)
  with pytest.raises(SystemExit) as exit_info:
    stages.run(config, trained, stages=("sample",))
  assert exit_info.value.code == preemption.EXIT_CODE
  assert not os.path.exists(path)
  assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]
  monkeypatch.undo()
  stages.run(config, trained, stages=("sample",))
  assert os.path.basename(path).startswith("T4_cfg2_temp1_topp1_conf1_seed0_")
  with np.load(path) as data:
    assert data["arr_0"].shape == (20, 16, 16, 1)
  # Any sampler setting, even one outside the readable part of the tag, makes a new set.
  other = trained_config()
  other.sampler.schedule = "linear"
  assert stages.sample.samples_path(other, trained) != stages.sample.samples_path(trained_config(),
                                                                        trained)
  # The sampler settings are not part of what was trained: the run config still matches.
  stages.run(trained_config(), trained, stages=("sample",))


def test_evaluation_with_other_settings_does_not_reuse_the_report(trained):
  config = trained_config()
  config.evaluation.classifier_steps = 60
  path = os.path.join(trained, stages.run_config.CONFIG_FILE)
  with open(path) as f:
    before = f.read()
  with pytest.raises(ValueError, match="computed with evaluation settings"):
    stages.run(config, trained, stages=("evaluate",))
  with open(path) as f:  # the refused run did not record its settings as the run's
    assert f.read() == before


def test_sampling_needs_trained_models(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint of the .tokenizer. stage"):
    stages.run(tiny_config(), str(tmp_path), stages=("sample",))
  with pytest.raises(FileNotFoundError, match="run the 'sample' stage first"):
    stages.run(tiny_config(), str(tmp_path), stages=("evaluate",))


def test_workdir_of_another_config_is_refused(trained):
  config = trained_config()
  config.tokenizer.quantizer.depth = 4
  config.tokenizer.model.latent_dim = 8
  with pytest.raises(ValueError, match="tokenizer.model.latent_dim, tokenizer.quantizer.depth"):
    stages.run(config, trained)


def test_a_refused_run_without_config_json_writes_none(trained, tmp_path):
  """config.json moved away: a run of another width is refused by the checkpoint check and
  leaves no config.json of its own, so the original config still runs there."""
  run_dir = str(tmp_path / "run")
  shutil.copytree(os.path.join(trained, "tokenizer"), os.path.join(run_dir, "tokenizer"))
  other = trained_config()
  other.tokenizer.model.latent_dim = 8
  with pytest.raises(trainer.CheckpointMismatchError, match="does not match the model"):
    stages.run(other, run_dir, stages=("tokenizer",))
  assert not os.path.exists(os.path.join(run_dir, stages.run_config.CONFIG_FILE))
  stages.run(trained_config(), run_dir, stages=("tokenizer",))
  with open(os.path.join(run_dir, stages.run_config.CONFIG_FILE)) as f:
    assert json.load(f)["tokenizer"]["model"]["latent_dim"] == \
        trained_config().tokenizer.model.latent_dim


def set_field(config, dotted: str, value):
  set_fields(config, {dotted: value})


@pytest.mark.parametrize("field, value, message", [
    ("data.image_size", 18, "image_size 18 is not divisible"),
    ("data.name", "svhn", "svhn"),
    ("stages", ("tokenizer", "generate"), "unknown stages \\['generate'\\]"),
    ("mesh.shape", (3,), "mesh.shape \\(3,\\)"),
    ("tokenizer.train.batch_size", 0, "batch size must be positive, got 0"),
    ("tokenizer.train.warmup_steps", 4, "warmup_steps \\(4\\) must be below"),
    # Fields of later stages fail at start-up, before the tokenizer trains.
    ("generator.train.keep_checkpoints", 0, "generator.train.keep_checkpoints must be >= 1"),
    ("generator.train.num_steps", -5, "generator.train.num_steps must be >= 1"),
    ("generator.train.checkpoint_every", 0, "generator.train.checkpoint_every must be >= 1"),
    ("generator.model.num_heads", 3, "width \\(32\\) must be a multiple of"),
    ("generator.model.num_layers", 0, "generator.model.num_layers must be >= 1"),
    ("sampler.cfg_scale", -1.0, "sampler.cfg_scale must be >= 0"),
    ("sampler.samples_per_class", 0, "samples_per_class and sampler.batch_size must be >= 1"),
    ("data.num_classes", 1, "x data.num_classes \\(1\\) = 2 samples"),
    ("evaluation.proxy_samples", 1, "evaluation.proxy_samples must be >= 2"),
    ("evaluation.proxy_reference_examples", 1, "proxy_reference_examples must be 0"),
])
def test_bad_config_values_are_clear_errors(tmp_path, field, value, message):
  config = tiny_config(num_steps=4)
  config.stages = ("tokenizer", "encode", "generator", "sample", "evaluate")
  config.evaluation.proxy_every = 2
  set_field(config, field, value)
  with pytest.raises(ValueError, match=message):
    stages.run(config, str(tmp_path))
  # A refused start leaves no checkpoint behind.
  assert not os.path.exists(os.path.join(tmp_path, "tokenizer", trainer.CHECKPOINT_DIR, "0"))


def test_the_proxy_reference_is_a_held_out_subset_or_the_reference_stats(tmp_path):
  """evaluation.proxy_reference_examples: the first N held-out images (0: all); with the
  Inception extractor, evaluation.reference_stats instead (no held-out pass at all)."""
  config = tiny_config()
  seen = []

  def extractor(images):  # per-image pixel moments: features that tell images apart
    images = np.asarray(images, np.float64).reshape(len(images), -1)
    seen.append(len(images))
    return np.stack([images.mean(1), images.std(1), images[:, 0]], 1), np.zeros((len(images), 2))

  real, _ = data_lib.load_all(config.data, config.data.eval_split)
  for count, expected in ((0, real), (37, real[:37])):
    config.evaluation.proxy_reference_examples = count
    got = stages.extractors.proxy_reference(config, extractor)
    want = features_lib.Reference.from_features(extractor(expected)[0])
    np.testing.assert_allclose(got.mu, want.mu)
    np.testing.assert_allclose(got.sigma, want.sigma)
  rng = np.random.default_rng(0)
  stats = str(tmp_path / "ref.npz")
  np.savez(stats, mu=rng.normal(size=2048), sigma=np.eye(2048))
  config.evaluation.update(extractor="inception", reference_stats=stats)
  seen.clear()
  np.testing.assert_array_equal(stages.extractors.proxy_reference(config, extractor).mu,
                                np.load(stats)["mu"])
  assert not seen


def test_a_held_out_split_too_small_for_the_knn_metrics_is_refused_at_start_up(tmp_path):
  rng = np.random.default_rng(0)
  for name, count in (("train.npz", 40), ("test.npz", 3)):
    np.savez(tmp_path / name, images=rng.integers(0, 256, (count, 16, 16, 1), np.uint8),
             labels=np.arange(count) % 10)
  config = tiny_config(num_steps=4)
  config.data.update(name="npz", path=str(tmp_path / "train.npz"),
                     eval_path=str(tmp_path / "test.npz"))
  config.stages = ("tokenizer", "encode", "generator", "sample", "evaluate")
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="held-out split 'test'.*has 3 images.*k = 3"):
    stages.run(config, str(workdir))
  assert not os.path.exists(workdir / "tokenizer")  # refused before any stage ran


def test_command_line_overrides_and_config_json(tmp_path):
  workdir = str(tmp_path / "cli")
  overrides = {
      "tokenizer.model.channels": 8, "tokenizer.model.latent_dim": 4,
      "tokenizer.model.norm_groups": 4, "tokenizer.quantizer.depth": 2,
      "tokenizer.quantizer.codebook_size": 8, "tokenizer.train.num_steps": 3,
      "tokenizer.train.warmup_steps": 1, "tokenizer.train.log_every": 1,
      "tokenizer.train.eval_every": 0, "tokenizer.train.batch_size": 8,
      "evaluation.classifier_steps": 20,  # the reconstruction-FID classifier
  }
  cmd = [sys.executable, "-m", "resgen_jax.main", "--config=configs/digits.py",
         f"--workdir={workdir}", "--config.stages=('tokenizer',)"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **CHILD_JAX_ENV)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  for key, value in overrides.items():
    section = saved
    for part in key.split("."):
      section = section[part]
    assert section == value, key
  assert saved["stages"] == ["tokenizer"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  with open(os.path.join(workdir, "tokenizer", stages.tokenizer.RESULTS_FILE)) as f:
    assert len(json.load(f)["psnr_by_depth"]) == 2


def test_run_config_differences_name_model_fields_only():
  base = config_base.base_config().to_dict()
  saved = json.loads(json.dumps(base))
  current = config_base.base_config()
  current.tokenizer.quantizer.depth = 8  # shapes the checkpoints
  current.generator.train.log_every = 7  # resumable
  assert stages.run_config.config_differences(saved, current.to_dict()) == [
      "tokenizer.quantizer.depth"]
  # A field added to the schema after the saved run matches at its default only.
  del saved["generator"]["train"]["grad_accum_steps"]
  current = config_base.base_config()
  assert stages.run_config.config_differences(saved, current.to_dict()) == []
  current.generator.train.grad_accum_steps = 2
  assert stages.run_config.config_differences(saved, current.to_dict()) == [
      "generator.train.grad_accum_steps"]


def test_tokenizer_refuses_gradient_accumulation(tmp_path):
  config = tiny_config()
  config.tokenizer.train.grad_accum_steps = 2
  with pytest.raises(ValueError, match="tokenizer.train.grad_accum_steps must be 1"):
    stages.tokenizer.run(config, str(tmp_path), mesh_lib.make_mesh(("data",), (-1,)))
  assert not os.listdir(tmp_path)  # nothing written


def test_sampling_sweep_writes_rows_table_and_plot(trained):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from resgen_jax import sweep  # pylint: disable=g-import-not-at-top
  config = trained_config()
  rows = sweep.run_sweep(config, trained, steps=[2, 4], cfg_scales=[1.0], temperatures=[1.0],
                         name="t")
  assert [(r["steps"], r["cfg_scale"]) for r in rows] == [(2, 1.0), (4, 1.0)]
  for r in rows:
    assert r["seconds_per_image"] > 0
    with open(os.path.splitext(r["samples"])[0] + "_eval.json") as f:
      assert json.load(f)["generated"]["frechet_distance"] == r["frechet_distance"]
  with open(os.path.join(trained, "sweeps", "t.json")) as f:
    assert json.load(f) == {"metric": "frechet_distance", "rows": rows}
  with open(os.path.join(trained, "sweeps", "t.md")) as f:
    table = f.read().splitlines()
  assert table[2].startswith("| T | CFG | temperature | ms / image |") and len(table) == 6
  assert Image.open(os.path.join(trained, "sweeps", "t.png")).size == sweep.PLOT_SIZE
  with pytest.raises(ValueError, match="at least one value"):
    sweep.run_sweep(config, trained, steps=[], cfg_scales=[1.0], temperatures=[1.0])
