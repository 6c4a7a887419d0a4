"""Atomic and streamed file writes: complete on disk or absent."""

import os

import numpy as np
import pytest

from resgen_jax.evaluation import fid
from resgen_jax.utils import files


def test_streamed_npz_equals_the_arrays_written_piece_by_piece(tmp_path, monkeypatch):
  monkeypatch.setattr(files, "COPY_BYTES", 100)  # several copies per array
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (23, 5, 4, 3)).astype(np.uint8)
  codes = rng.integers(0, 1000, (23, 2, 2, 4)).astype(np.int32)
  path = str(tmp_path / "out" / "set.npz")
  with files.StreamingNpz(path, arr_0=(images.shape, np.uint8),
                          codes=(codes.shape, np.int32)) as out:
    for start in range(0, 23, 7):
      out["arr_0"][start:start + 7] = images[start:start + 7]
      out["codes"][start:start + 7] = codes[start:start + 7]
    out.small["seconds"] = np.float64(0.25)
    assert not os.path.exists(path)  # nothing at the path until the archive is complete
  with np.load(path, allow_pickle=False) as data:
    assert sorted(data.files) == ["arr_0", "codes", "seconds"]
    np.testing.assert_array_equal(data["arr_0"], images)
    np.testing.assert_array_equal(data["codes"], codes)
    assert data["seconds"] == 0.25
  streamed = np.concatenate(list(fid.npz_member_batches(path, "arr_0", 5)))
  np.testing.assert_array_equal(streamed, images)
  assert os.listdir(tmp_path / "out") == ["set.npz"]  # no scratch files left


def test_a_failed_stream_leaves_an_existing_file_and_no_scratch(tmp_path):
  path = str(tmp_path / "set.npz")
  np.savez(path, arr_0=np.ones(3))
  with pytest.raises(RuntimeError, match="sampler failed"):
    with files.StreamingNpz(path, arr_0=((4, 2), np.float32)) as out:
      out["arr_0"][:2] = 1.0
      raise RuntimeError("sampler failed")
  np.testing.assert_array_equal(np.load(path)["arr_0"], np.ones(3))
  assert os.listdir(tmp_path) == ["set.npz"]
  with pytest.raises(ValueError, match="needs a leading axis"):
    files.StreamingNpz(path, t=((), np.float64))
  assert os.listdir(tmp_path) == ["set.npz"]
