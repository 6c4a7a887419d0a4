"""Atomic file writes: a result is either complete on disk or absent, never half-written;
and the short settings hashes that name outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

SETTINGS_HASH_CHARS = 8  # enough to tell settings apart in a file name, short enough to read


def settings_hash(values) -> str:
  """A short stable hash of JSON-able ``values`` (a config section's ``to_dict()``, or a
  dict of several): the same in every process and session, so an output named by it is
  found again by a rerun with the same settings and never reused by other settings."""
  digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
  return digest[:SETTINGS_HASH_CHARS]


def umask_mode() -> int:
  """The mode a plain ``open(path, "w")`` would give a new file: 0666 less the umask (read
  without changing it for good)."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def remove_leftovers(path: str) -> None:
  """Removes what an interrupted write of ``path`` left beside it: the ``.tmp-<name>*``
  files of :func:`atomic_write` and scratch folders of :class:`StreamingNpz` (a killed
  sample stage's full-size arrays). Other writers' temporaries are not touched."""
  directory, name = os.path.split(os.path.abspath(path))
  if not os.path.isdir(directory):
    return
  for entry in os.listdir(directory):
    if entry.startswith(".tmp-" + name):
      leftover = os.path.join(directory, entry)
      if os.path.isdir(leftover):
        shutil.rmtree(leftover, ignore_errors=True)
      else:
        os.remove(leftover)


@contextlib.contextmanager
def atomic_write(path: str):
  """Yields a temporary path beside ``path``; renames it onto ``path`` only on success. The
  file gets the mode the umask allows (``mkstemp`` makes it 0600), so results on a shared
  filesystem are as readable as the checkpoints beside them."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  remove_leftovers(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npz(path: str, **arrays) -> None:
  with atomic_write(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def save_bytes(path: str, blob: bytes) -> None:
  with atomic_write(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(blob)


def save_json(path: str, obj) -> None:
  with atomic_write(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")


# Bytes copied from a disk-backed array into the archive per write: bounded memory for any
# array size.
COPY_BYTES = 64 * 2 ** 20


class StreamingNpz:
  """Builds an ``.npz`` whose arrays are filled piece by piece, with memory for one piece.

  Every array's shape and dtype are declared up front; each lives as a disk-backed ``.npy``
  (``np.lib.format.open_memmap``) in a scratch directory beside ``path`` until
  :meth:`close` writes the archive (uncompressed, zip64; ``np.load`` reads it) and renames
  it onto ``path``. Until then ``path`` is untouched; on an error nothing is left behind.

      with StreamingNpz(path, arr_0=((n, 64, 64, 3), np.uint8)) as out:
        out["arr_0"][i:j] = batch
  """

  def __init__(self, path: str, **specs):
    for name, (shape, _) in specs.items():
      if len(shape) < 1:
        raise ValueError(f"streamed array {name!r} needs a leading axis, got shape {shape}")
    self.path = path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_leftovers(path)
    self._scratch = tempfile.mkdtemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    self.arrays = {}
    for name, (shape, dtype) in specs.items():
      self.arrays[name] = np.lib.format.open_memmap(
          os.path.join(self._scratch, name + ".npy"), mode="w+", dtype=np.dtype(dtype),
          shape=tuple(shape))
    self.small = {}  # arrays given whole (e.g. scalars), written after the streamed ones

  def __getitem__(self, name: str) -> np.ndarray:
    return self.arrays[name]

  def close(self) -> None:
    """Writes the archive onto ``path`` and removes the scratch files."""
    with atomic_write(self.path) as tmp:
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in self.arrays.items():
          with archive.open(name + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(
                member, np.lib.format.header_data_from_array_1_0(array))
            rows = max(1, COPY_BYTES // max(1, array[:1].nbytes))
            for start in range(0, array.shape[0], rows):
              member.write(np.ascontiguousarray(array[start:start + rows]).tobytes())
        for name, array in self.small.items():
          with archive.open(name + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    self._discard()

  def _discard(self) -> None:
    self.arrays = {}  # drops the maps before their files go
    shutil.rmtree(self._scratch, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self._discard()
