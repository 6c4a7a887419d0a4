"""Atomic file writes: a result is either complete on disk or absent, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str):
  """Yields a temporary path beside ``path``; renames it onto ``path`` only on success."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npz(path: str, **arrays) -> None:
  with atomic_write(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def save_json(path: str, obj) -> None:
  with atomic_write(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
