"""SIGTERM as a flag that every long loop polls, so a preempted run saves within its grace.

Spot and preemptible machines give about 30 s between SIGTERM and the kill. The training
loop polls between steps (and saves); evaluation passes, the FID proxy, encoding and
sampling poll between batches through :func:`check`, which raises :class:`Preempted`, so
the save (or the clean exit) starts within one batch of the signal wherever the run is.

With several processes the flag is agreed on (any process signalled) at every poll, a
collective: every process polls at the same points, as it runs the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterable, Iterator, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODE = 143  # 128 + SIGTERM: what schedulers expect of a terminated job


class Preempted(Exception):
  """Raised by :func:`check` inside a loop that must stop because of a SIGTERM."""


T = TypeVar("T")
_state = {"requested": False, "depth": 0, "previous": None}


def _handle(signum, frame) -> None:
  del signum, frame
  logging.warning("SIGTERM received: stopping at the next batch boundary, saving first")
  _state["requested"] = True
  _restore()


def _restore() -> None:
  if _state["previous"] is not None:
    signal.signal(signal.SIGTERM, _state["previous"])
    _state["previous"] = None


@contextlib.contextmanager
def watch():
  """Turns SIGTERM into the polled flag for the duration (nested uses share the outermost;
  the outermost starts with the flag clear). After the first SIGTERM the previous handler
  is back, so a second one stops the process at once. Off the main thread (where handlers
  cannot be installed) only orbax's preemption notices and explicit requests stop a run."""
  outermost = _state["depth"] == 0
  if outermost:
    _state["requested"] = False
    if threading.current_thread() is threading.main_thread():
      _state["previous"] = signal.signal(signal.SIGTERM, _handle)
  _state["depth"] += 1
  try:
    yield
  finally:
    _state["depth"] -= 1
    if outermost:
      _restore()


def requested(agree: bool = True) -> bool:
  """Whether a SIGTERM has arrived: at any process when ``agree`` (a collective with several
  processes: call it where every process is in step), else at this one (for loops that
  process 0 runs alone, e.g. scoring samples)."""
  local = _state["requested"]
  if agree and jax.process_count() > 1:
    local = bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
  return local


def check(agree: bool = True) -> None:
  """Raises :class:`Preempted` once a SIGTERM has arrived (see :func:`requested`)."""
  if requested(agree):
    raise Preempted("SIGTERM received")


def checked(items: Iterable[T], agree: bool = True) -> Iterator[T]:
  """``items``, with :func:`check` before each: a loop over it stops at the next item."""
  for item in items:
    check(agree)
    yield item
