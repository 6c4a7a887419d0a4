"""bench/study.py's bookkeeping: sampler labels from recorded settings, seed statistics,
the bootstrap, the command-line overrides, and moving a trained base between machines."""

import os

import jax
import numpy as np
import pytest

from bench import study
from conftest import TRAINED_STEPS, trained_config
from resgen_jax import config_base, stages
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import trainer
from resgen_jax.evaluation import features as features_lib


def row(seed, fd, family="resgen", **sampler):
  sampler = dict(dict(steps=8, confidence_depths="first"), **sampler)
  return {"variant": "base", "sampler_name": "x", "family": family, "depth": 4,
          "seed": seed, "params": 10, "train_steps": 5, "sampler": sampler,
          "frechet_distance": fd, "class_agreement": 0.5, "precision": 0.1, "recall": 0.2,
          "seconds_per_image": 1e-3, "frechet_bootstrap_std": 0.3}


def test_sampler_labels_come_from_the_settings_not_the_name():
  assert study.sampler_label({"steps": 8}, "resgen") == "T8 each"  # made before the field
  assert study.sampler_label({"steps": 16, "confidence_depths": "first", "cfg_scale": 2.0,
                              "confidence": "mixture"}, "resgen") == \
      "T16 first confidence=mixture cfg_scale=2.0"
  assert study.sampler_label({"steps": 16, "confidence": "mixture"}, "direct") == "T16 each"
  assert study.sampler_label({"steps": 16}, "rq_transformer") == "AR"


def test_summary_means_and_stds_over_seeds_count_a_seed_once():
  rows = [row(0, 10.0), row(1, 14.0), row(1, 14.0, cfg_scale=2.0), row(0, 3.0, steps=16)]
  rows.append(dict(row(1, 14.0), sampler_name="another name, same settings"))
  summary = {s["sampler"]: s for s in study.summarize(rows)}
  assert summary["T8 first"]["seeds"] == 2
  assert summary["T8 first"]["frechet_distance"] == pytest.approx(12.0)
  assert summary["T8 first"]["frechet_distance_std"] == pytest.approx(np.std([10, 14], ddof=1))
  assert summary["T16 first"]["seeds"] == 1 and np.isnan(
      summary["T16 first"]["frechet_distance_std"])
  assert "T8 first cfg_scale=2.0" in summary


def test_bootstrap_of_the_frechet_distance():
  rng = np.random.default_rng(0)
  reference = features_lib.Reference.from_features(rng.normal(size=(400, 3)))
  same = study.bootstrap_frechet(reference, rng.normal(size=(400, 3)), 30, 0)
  shifted = study.bootstrap_frechet(reference, rng.normal(size=(400, 3)) + 2.0, 30, 0)
  assert same["frechet_bootstrap_std"] > 0
  low, high = shifted["frechet_bootstrap_95"]
  assert low <= 12.0 <= high + 1.0  # |shift|^2 = 3 * 4
  assert shifted["frechet_bootstrap_mean"] > 10 * same["frechet_bootstrap_mean"]


def test_overrides_and_sampler_specs():
  config = config_base.base_config()
  study.set_field(config, "generator.loss.learn_sigma=true")
  study.set_field(config, "mesh.shape=[2]")
  assert config.generator.loss.learn_sigma is True and config.mesh.shape == (2,)
  with pytest.raises(ValueError, match="no field 'generator.loss.nope'"):
    study.set_field(config, "generator.loss.nope=1")
  with pytest.raises(ValueError, match="field=value"):
    study.set_field(config, "generator.loss.sigma")
  assert study.parse_sampler("first_T16:confidence_depths=first,steps=16") == (
      "first_T16", {"confidence_depths": "first", "steps": 16})
  assert study.parse_sampler("default") == ("default", {})


def test_the_headline_puts_both_reveal_rules_side_by_side():
  rows = [row(0, 10.0), row(1, 12.0), row(0, 20.0, confidence_depths="each"),
          row(0, 5.0, family="rq_transformer")]
  table = study.headline(study.summarize(rows))
  lines = table.strip().split("\n")
  assert lines[2] == "| resgen | 4 | 20.00 +- nan (1) | 11.00 +- 1.41 (2) | 0.500 | 0.200 |"
  assert lines[3].startswith("| rq_transformer | 4 | 5.00 +- nan (1) | 5.00 +- nan (1) |")


def test_a_packed_base_unpacks_to_the_same_finished_tokenizer(trained_run, tmp_path):
  """pack -> unpack moves the trained tokenizer between machines: the finished step, its
  report and the same weights; an existing base is never overwritten."""
  work = tmp_path / "work"
  work.mkdir()
  os.symlink(trained_run, work / study.BASE_DIR)
  archive = str(tmp_path / study.BASE_ARCHIVE)
  study.pack_base(str(work), archive)
  base = str(tmp_path / "new" / study.BASE_DIR)
  assert study.unpack_base(archive, base)
  assert not study.unpack_base(archive, base)  # a base with a tokenizer stays as it is
  assert trainer.latest_checkpoint_step(os.path.join(base, "tokenizer")) == TRAINED_STEPS
  for name in study.PACKED:
    with open(os.path.join(base, name)) as f, open(os.path.join(trained_run, name)) as g:
      assert f.read() == g.read(), name
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  config = trained_config()
  (_, ours), (_, theirs) = (stages.tokenizer.load(config, d, mesh) for d in (base, trained_run))
  for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(SystemExit, match="no tokenizer checkpoint"):
    study.pack_base(str(tmp_path / "nothing"), str(tmp_path / "x.tar.gz"))
