"""Atomic writes honour the umask; an unchanged run config is not rewritten."""

import os

import numpy as np
import pytest

from resgen_jax import config_base, stages
from resgen_jax.utils import files


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_the_umask_allows(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    files.save_json(str(tmp_path / "a.json"), {"x": 1})
    with files.StreamingNpz(str(tmp_path / "s.npz"), arr_0=((3, 2), np.uint8)) as out:
      out["arr_0"][:] = 7
  finally:
    os.umask(old)
  for name in ("a.json", "s.npz"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == mode
  assert os.umask(old) == old  # reading the umask left it as it was
  os.umask(old)


def test_an_unchanged_run_config_is_not_rewritten(tmp_path):
  config = config_base.base_config()
  stages.run_config.write_run_config(config, str(tmp_path))
  path = tmp_path / stages.run_config.CONFIG_FILE
  before = os.stat(path)
  stages.run_config.write_run_config(config, str(tmp_path))
  after = os.stat(path)
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  config.sampler.steps = 16  # a resumable change is recorded
  stages.run_config.write_run_config(config, str(tmp_path))
  assert os.stat(path).st_ino != before.st_ino


def test_a_new_write_removes_what_an_interrupted_one_left(tmp_path):
  scratch = tmp_path / ".tmp-s.npzk3j2"  # a killed StreamingNpz's arrays
  scratch.mkdir()
  (scratch / "arr_0.npy").write_bytes(b"\0" * 1000)
  (tmp_path / ".tmp-a.jsonq1").write_text("half")  # a killed atomic_write
  (tmp_path / ".tmp-other.npzx").write_text("another target's")
  files.save_json(str(tmp_path / "a.json"), {"x": 1})
  with files.StreamingNpz(str(tmp_path / "s.npz"), arr_0=((2,), np.uint8)) as out:
    out["arr_0"][:] = 1
  assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other.npzx", "a.json", "s.npz"]


def test_fields_of_a_stage_without_checkpoints_may_change(tmp_path):
  """A run refused on a bad generator value after the tokenizer trained leaves the value
  in config.json; the corrected rerun is accepted while the generator has no checkpoint,
  the tokenizer's fields stay fixed, and once the generator has one its fields are too."""
  config = config_base.base_config()
  config.generator.model.width = 999
  stages.run_config.write_run_config(config, str(tmp_path))
  os.makedirs(tmp_path / "tokenizer" / "checkpoints" / "5")
  config.generator.model.width = 128
  stages.run_config.write_run_config(config, str(tmp_path))
  changed = config.copy_and_resolve_references()
  changed.tokenizer.model.latent_dim = 8
  with pytest.raises(ValueError, match="fields: tokenizer.model.latent_dim"):
    stages.run_config.write_run_config(changed, str(tmp_path))
  os.makedirs(tmp_path / "generator" / "checkpoints" / "7")
  config.generator.model.width = 64
  with pytest.raises(ValueError, match="fields: generator.model.width"):
    stages.run_config.write_run_config(config, str(tmp_path))
