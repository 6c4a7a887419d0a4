"""Reading the token cache through memory maps: the same codes as loading it, from any
chunk layout, without holding the codes in memory."""

import os

import numpy as np
import pytest

from resgen_jax.codec import token_cache
from resgen_jax.utils import files


@pytest.mark.parametrize("shape,dtype", [((7, 3, 2, 5), np.int16), ((4, 2), np.int32),
                                         ((6,), np.float32), ((0, 2, 2, 3), np.int16)])
def test_a_mapped_npz_member_equals_the_loaded_array(tmp_path, shape, dtype):
  rng = np.random.default_rng(0)
  arrays = {"labels": rng.integers(0, 9, (5,)).astype(np.int32),
            "codes": rng.integers(-300, 300, shape).astype(dtype),
            "first_batch": np.int64(3)}
  path = str(tmp_path / "chunk.npz")
  files.save_npz(path, **arrays)
  for name, expected in arrays.items():
    mapped = token_cache.map_npz_member(path, name)
    assert mapped.dtype == expected.dtype and mapped.shape == np.shape(expected)
    np.testing.assert_array_equal(mapped, expected)
  if np.prod(shape):
    assert isinstance(token_cache.map_npz_member(path, "codes"), np.memmap)
  fortran = str(tmp_path / "fortran.npz")
  files.save_npz(fortran, codes=np.asfortranarray(arrays["codes"]))
  np.testing.assert_array_equal(token_cache.map_npz_member(fortran, "codes"), arrays["codes"])


def test_a_compressed_member_is_refused_by_name(tmp_path):
  path = str(tmp_path / "packed.npz")
  np.savez_compressed(path, codes=np.zeros((4, 4), np.int16))
  with pytest.raises(ValueError, match="'codes' is compressed"):
    token_cache.map_npz_member(path, "codes")


def write_cache(workdir, split, chunk_sizes, grid=(2, 3), depth=4, processes=1, seed=0):
  """A token cache of ``chunk_sizes[p]`` examples per chunk of process p. -> codes, labels
  in the order load_tokens reads them."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(workdir, token_cache.TOKENS_DIR), exist_ok=True)
  codes, labels = [], []
  for p in range(processes):
    for c, n in enumerate(chunk_sizes[p]):
      codes.append(rng.integers(0, 64, (n,) + grid + (depth,)).astype(np.int16))
      labels.append(rng.integers(0, 10, (n,)).astype(np.int32))
      files.save_npz(token_cache.chunk_path(workdir, split, p, processes, c), codes=codes[-1],
                     labels=labels[-1], first_batch=np.int64(c), num_batches=np.int64(1))
  files.save_json(token_cache.meta_path(workdir),
                  {"grid": list(grid), "depth": depth, "process_count": processes})
  files.save_npz(os.path.join(workdir, token_cache.TOKENS_DIR, token_cache.CODEBOOKS_FILE),
                 codebooks=np.zeros((1, 64, 2), np.float32))
  return np.concatenate(codes).astype(np.int32), np.concatenate(labels)


def test_the_mapped_source_reads_the_codes_of_every_chunk(tmp_path):
  workdir = str(tmp_path)
  codes, labels = write_cache(workdir, "train", [[5, 0, 3], [4, 6]], processes=2)
  # files of another process count are ignored, as by load_tokens
  files.save_npz(token_cache.chunk_path(workdir, "train", 0, 3, 0),
                 codes=np.zeros((9, 2, 3, 4), np.int16), labels=np.zeros((9,), np.int32))
  loaded = token_cache.load_tokens(workdir, "train")
  np.testing.assert_array_equal(loaded[0], codes)
  for depth in (0, 2):
    source = token_cache.token_source(workdir, "train", 10, depth)
    want = codes if depth == 0 else codes[..., :depth]
    assert source.num_examples == 18 and source.image_shape == want.shape[1:]
    assert all(isinstance(c, np.memmap) for c in source.chunks)  # not read into memory
    indices = np.random.default_rng(1).permutation(18)[:11]
    indices[3] = indices[7]  # repeats come back too
    got_codes, got_labels = source.get(indices)
    assert got_codes.dtype == np.int32
    np.testing.assert_array_equal(got_codes, want[indices])
    np.testing.assert_array_equal(got_labels, labels[indices])
    np.testing.assert_array_equal(source.get(np.arange(18))[0], want)
    assert source.get(np.zeros((0,), np.int64))[0].shape == (0,) + want.shape[1:]
  with pytest.raises(IndexError, match=r"indices must be in \[0, 18\)"):
    source.get(np.array([18]))
  with pytest.raises(ValueError, match="depth 5 beyond the cache's 4"):
    token_cache.token_source(workdir, "train", 10, 5)


def test_batches_over_the_mapped_source_equal_those_over_memory(tmp_path):
  """The generator's shuffled iterator gives the same batches from the mapped cache as from
  the codes held in memory (an ArraySource of load_tokens)."""
  from resgen_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  codes, labels = write_cache(workdir, "train", [[7, 7, 2]])
  mapped = token_cache.TokenBatches(token_cache.token_source(workdir, "train", 10), 4, seed=3)
  memory = token_cache.TokenBatches(data_lib.ArraySource("mem", codes, labels, 10), 4, seed=3)
  for _ in range(9):  # past an epoch
    a, b = next(mapped), next(memory)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
